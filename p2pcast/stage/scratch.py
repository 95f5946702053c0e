"""Where staging happens: a private scratch directory beside the destination.

Unpacking happens in ``.NAME.staging-XXXXXX`` (mode 0700) next to ``dest`` and
the finished tree is renamed onto ``dest``, so ``dest`` is either absent or
complete, and nobody else can reach a setuid file or device node in the
moments before it is neutralised. Same directory, so the rename is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from p2pcast.errors import StageError
from p2pcast.stage.remove import remove_tree

log = logging.getLogger(__name__)


def scratch_prefix(dest: Path) -> str:
    return f".{dest.name}.staging-"


def check_dest_free(dest: Path) -> bool:
    """Refuse a destination that holds anything; return whether it exists (empty)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StageError(f"cannot use staging destination {dest}: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        try:
            with os.scandir(dest) as it:
                if next(it, None) is None:
                    return True
        except OSError as exc:
            raise StageError(f"cannot use staging destination {dest}: {exc.strerror}") from exc
    raise StageError(f"staging destination {dest} exists and is not an empty directory")


def no_space_or(exc: OSError, where: Path, doing: str) -> StageError:
    """Translate an OSError from staging into one line, calling out a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StageError(f"no space left on {where} while {doing}")
    return StageError(f"{doing} failed: {exc}")


@contextlib.contextmanager
def private_workdir(dest: Path) -> Iterator[Path]:
    """A fresh 0700 directory beside ``dest``, removed when the block exits."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=scratch_prefix(dest), dir=dest.parent))
    except OSError as exc:
        raise no_space_or(exc, dest.parent, f"creating a staging directory for {dest}") from exc
    try:
        yield work
    except BaseException as exc:
        try:
            remove_tree(work)
        except Exception as cleanup:  # keep the original error, but say what was left
            log.error("could not remove partial staging %s: %s", work, cleanup)
            exc.add_note(f"partial staging left at {work}: {cleanup}")
        raise
    try:
        remove_tree(work)
    except OSError as exc:
        raise StageError(f"cannot remove staging scratch {work}: {exc.strerror}") from exc


def publish(root: Path, dest: Path) -> None:
    """Move a finished tree onto ``dest`` (absent or an empty directory), atomically."""
    try:
        os.rename(root, dest)
    except OSError as exc:
        raise StageError(
            f"cannot move the staged tree into place at {dest}: {exc.strerror}"
        ) from exc


def remove_stale_scratch(dest: Path) -> None:
    """Remove scratch directories of ``dest`` left by a staging that was killed."""
    prefix = scratch_prefix(dest)
    try:
        with os.scandir(dest.parent) as it:
            stale = [e.name for e in it if e.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for name in stale:
        remove_tree(dest.parent / name)
