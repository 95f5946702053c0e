"""Removing a staged tree: no symlink followed, no mount crossed, no recursion.

The tree may belong to the job's user (``owner``) and the epilog removes it as
root, so every directory is reached from the top with O_NOFOLLOW, and one on
another device (a bind mount nobody could undo) stops the removal instead of
emptying whatever is mounted there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from p2pcast.errors import StageError
from p2pcast.stage.tree import Parts, descend, open_child_dir, open_dir_in


def _make_traversable(parent_fd: int, name: str) -> None:
    """Give the owner rwx on a directory so a non-root caller can empty it."""
    if os.geteuid() != 0:
        # Only our own files can be chmodded without root, so following a
        # raced-in symlink here cannot reach anything we could not touch anyway.
        os.chmod(name, 0o700, dir_fd=parent_fd)


def _open_for_removal(parent_fd: int, name: str, parts: Parts, root_dev: int) -> int:
    try:
        fd = open_child_dir(parent_fd, name, parts, "removal")
    except PermissionError:
        _make_traversable(parent_fd, name)
        fd = open_child_dir(parent_fd, name, parts, "removal")
    if os.fstat(fd).st_dev != root_dev:
        os.close(fd)
        raise StageError(
            f"refusing to remove {'/'.join(parts)!r}: another filesystem is mounted there"
        )
    return fd


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it without following any symlink.

    ``path`` itself is not followed either: a symlink there is unlinked. The
    parent of ``path`` is trusted (it is the configured staging directory).
    Never descends into another filesystem, so a forgotten bind mount inside
    a staged tree cannot cost the data behind it. Missing ``path`` is fine.
    """
    try:
        parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.lstat(path.name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent_fd)
            return
        top = _open_for_removal(parent_fd, path.name, (path.name,), st.st_dev)
        try:
            _empty_tree(top, st.st_dev)
        finally:
            os.close(top)
        os.rmdir(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _empty_tree(top_fd: int, root_dev: int) -> None:
    # Post-order without recursion: a directory is visited twice, once to
    # unlink its files and queue its subdirectories, once (after them) to be
    # removed from its parent. Each visit re-walks from the top with
    # O_NOFOLLOW instead of holding one fd per level.
    pending: list[tuple[Parts, bool]] = [((), False)]
    while pending:
        parts, emptied = pending.pop()
        if emptied:
            parent = open_dir_in(top_fd, parts[:-1], "removal")
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            finally:
                os.close(parent)
            continue
        fd = _walk_for_removal(top_fd, parts, root_dev)
        try:
            if os.geteuid() != 0 and stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o700)
            with os.scandir(fd) as it:
                entries = list(it)
            if parts:
                pending.append((parts, True))
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(((*parts, entry.name), False))
                else:
                    os.unlink(entry.name, dir_fd=fd)
        finally:
            os.close(fd)


def _walk_for_removal(top_fd: int, parts: Parts, root_dev: int) -> int:
    return descend(top_fd, parts, lambda fd, name, sub: _open_for_removal(fd, name, sub, root_dev))
