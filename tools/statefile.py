"""State files of the tools that start things (cluster.py, ceph.py, slurm.py).

Each tool keeps one JSON file per instance in a directory of its own under
/run, written before anything is started (so that `down` can find and stop
what a crashed `up` left), replaced atomically, and changed only under an
exclusive flock on that directory (an `up` and a `down` of the same name, from
two shells or test processes, must not interleave). Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class StateFiles:
    """DIRECTORY/NAME.json for each instance; ERROR is the tool's own exception class.
    PRIVATE files (they hold secrets) are readable by root only; MODE is the
    directory's."""

    def __init__(
        self, directory: Path, error: type[Exception], *, private: bool = False, mode: int = 0o755
    ) -> None:
        self.directory = directory
        self.error = error
        self.private = private
        self.mode = mode

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def read(self, name: str) -> dict[str, Any] | None:
        """The state of NAME, or None if it has none; a damaged file is the tool's error."""
        path = self.path(name)
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise self.error(f"unreadable state file {path}: {exc}") from exc
        return state

    def write(self, name: str, state: Mapping[str, Any]) -> None:
        """Replace NAME's state at once: a reader sees the old file or the new one."""
        path = self.path(name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if self.private else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize changes to instances and their state files."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=self.mode)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
