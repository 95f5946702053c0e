"""Filesystem primitives for staging that never follow a symlink.

A staged root filesystem is full of symlinks (``/etc/alternatives``,
``/var/run -> /run``) that are meant for the container, not for the host. Every
path inside a tree is therefore reached one component at a time from a
directory fd with ``O_NOFOLLOW``, so a symlink can never redirect a write,
chmod, chown or unlink to the host. The trees are walked iteratively, not
recursively: a hostile archive's depth must not become a RecursionError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Callable

from p2pcast.errors import StageError

#: Opens a directory, failing (ENOTDIR or ELOOP) on a symlink instead of following it.
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Path components one member may have. Real root filesystems are under 64
#: deep; the bound keeps the directory-fd cache of the extractor (one fd per
#: level) far below the usual 1024-fd limit.
MAX_PATH_DEPTH = 256

#: Bytes in one normalised path: PATH_MAX, beyond which ch-run and every
#: other tool that uses whole paths would fail on the staged tree anyway.
MAX_PATH_BYTES = 4096

#: Symlinks followed while resolving a mount point, as the kernel's own
#: limit (MAXSYMLINKS) for one path lookup.
MAX_SYMLINK_HOPS = 40

#: Mode of directories that staging creates itself (missing parents of a
#: member, mount points): what ``tar`` gives them under the usual umask.
IMPLIED_DIR_MODE = 0o755

Parts = tuple[str, ...]


def split_inside(name: str, what: str) -> Parts:
    """Normalise an archive path to components below the root.

    Leading "/" is stripped (tar's convention for absolute members); a path
    whose lexical normalisation leaves the root ("../x", "a/../../x") is
    refused. The empty tuple is the root itself.
    """
    if "\0" in name:
        raise StageError(f"refusing {what}: path contains a NUL byte")
    stripped = name.lstrip("/")
    norm = posixpath.normpath(stripped) if stripped else "."
    if norm == ".":
        return ()
    parts = tuple(norm.split("/"))
    if parts[0] == "..":
        raise StageError(f"refusing {what}: path {name!r} leaves the destination")
    if len(parts) > MAX_PATH_DEPTH or len(os.fsencode(norm)) > MAX_PATH_BYTES:
        raise StageError(f"refusing {what}: path {name[:80]!r}... is too deep or too long")
    return parts


def _refuse_component(parent_fd: int, name: str, parts: Parts, what: str) -> StageError:
    """Explain why ``name`` (below ``parent_fd``) could not be opened as a directory."""
    shown = "/".join(parts)
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except OSError:
        return StageError(f"refusing {what}: {shown!r} changed while staging")
    if stat.S_ISLNK(st.st_mode):
        return StageError(f"refusing {what}: path goes through symlink {shown!r}")
    return StageError(f"refusing {what}: {shown!r} is not a directory")


def open_child_dir(parent_fd: int, name: str, parts: Parts, what: str) -> int:
    """Open directory ``name`` below ``parent_fd`` without following a symlink."""
    try:
        return os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _refuse_component(parent_fd, name, parts, what) from exc
        raise


def descend(root_fd: int, parts: Parts, open_step: Callable[[int, str, Parts], int]) -> int:
    """Open ``parts`` below ``root_fd`` one directory at a time with
    ``open_step(parent_fd, name, parts_so_far)``; the caller closes the result."""
    fd = os.dup(root_fd)
    try:
        for depth, name in enumerate(parts):
            child = open_step(fd, name, parts[: depth + 1])
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir_in(root_fd: int, parts: Parts, what: str) -> int:
    """Open the existing directory ``parts`` below ``root_fd``; the caller closes it."""
    return descend(root_fd, parts, lambda fd, name, sub: open_child_dir(fd, name, sub, what))


class DirCache:
    """Directory fds below a root, reused while consecutive paths share a prefix.

    Archives list a directory's entries together, so keeping the fds of the
    current directory's ancestors turns most lookups into zero syscalls.
    Missing directories are created (owner-only until ``finalize``), which is
    what tar does for members whose parents are not in the archive.
    """

    def __init__(self, root_fd: int, owner: tuple[int, int] | None) -> None:
        self.root_fd = root_fd
        self.owner = owner
        self._parts: list[str] = []
        self._fds: list[int] = []
        #: Final mode and mtime of every directory staged, applied at the end
        #: so a read-only directory does not block writing its own entries.
        self.dir_modes: dict[Parts, tuple[int, float | None]] = {}

    def get(self, parts: Parts, what: str) -> int:
        """Return an fd (owned by the cache) for directory ``parts``, made if missing."""
        keep = 0
        while keep < min(len(parts), len(self._parts)) and parts[keep] == self._parts[keep]:
            keep += 1
        self._truncate(keep)
        for depth in range(keep, len(parts)):
            parent = self._fds[-1] if self._fds else self.root_fd
            name = parts[depth]
            try:
                fd = os.open(name, O_DIR, dir_fd=parent)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, O_DIR, dir_fd=parent)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                self.dir_modes.setdefault(parts[: depth + 1], (IMPLIED_DIR_MODE, None))
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise _refuse_component(parent, name, parts[: depth + 1], what) from exc
                raise
            self._parts.append(name)
            self._fds.append(fd)
        return self._fds[-1] if self._fds else self.root_fd

    def _truncate(self, keep: int) -> None:
        while len(self._fds) > keep:
            os.close(self._fds.pop())
            self._parts.pop()

    def finalize(self) -> None:
        """Apply the recorded directory modes and mtimes, deepest first."""
        self._truncate(0)
        for parts in sorted(self.dir_modes, key=len, reverse=True):
            mode, mtime = self.dir_modes[parts]
            try:
                fd = open_dir_in(self.root_fd, parts, "directory")
            except (StageError, FileNotFoundError):
                continue  # replaced or removed by a later member: nothing to fix
            try:
                os.fchmod(fd, mode)
                if mtime is not None:
                    with contextlib.suppress(OverflowError, ValueError):
                        os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    def close(self) -> None:
        self._truncate(0)


def clear_entry(parent_fd: int, name: str, what: str) -> None:
    """Remove whatever non-directory (or empty directory) is at ``name``.

    Creating a new file with O_EXCL after this means an existing symlink or
    hard link is replaced, never written through (GNU tar's default too).
    """
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise StageError(f"refusing {what}: it would replace a non-empty directory") from exc
        raise


def sanitize_mode(mode: int) -> int:
    """tarfile.tar_filter's rule: no setuid/setgid/sticky, no group/other write."""
    return mode & 0o755


def neutralise_tree(root_fd: int, owner: tuple[int, int]) -> tuple[int, int]:
    """Make a tree unpacked by another tool (unsquashfs) as safe as our own untar.

    Removes device nodes, FIFOs and sockets, clears setuid/setgid/sticky and
    group/other write, and gives every entry to ``owner``. Returns (entries
    removed, modes changed). Only for a tree nobody else can reach yet.
    """
    removed = changed = 0
    pending: list[Parts] = [()]
    uid, gid = owner
    st = os.fstat(root_fd)
    os.fchown(root_fd, uid, gid)
    if sanitize_mode(stat.S_IMODE(st.st_mode)) != stat.S_IMODE(st.st_mode):
        changed += 1
    os.fchmod(root_fd, sanitize_mode(stat.S_IMODE(st.st_mode)))
    while pending:
        parts = pending.pop()
        fd = open_dir_in(root_fd, parts, "unpacked entry")
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                fmt = stat.S_IFMT(st.st_mode)
                if fmt not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
                    continue
                if (st.st_uid, st.st_gid) != owner:
                    os.chown(entry.name, uid, gid, dir_fd=fd, follow_symlinks=False)
                if fmt == stat.S_IFLNK:
                    continue
                perm = stat.S_IMODE(st.st_mode)
                # chown may already have dropped setuid; compare with the
                # original mode so the count reflects what the image asked for.
                if sanitize_mode(perm) != perm:
                    changed += 1
                if fmt == stat.S_IFDIR:
                    child = open_child_dir(fd, entry.name, (*parts, entry.name), "unpacked entry")
                    try:
                        os.fchmod(child, sanitize_mode(perm))
                    finally:
                        os.close(child)
                    pending.append((*parts, entry.name))
                else:
                    # lstat just said regular file, and the tree is private, so
                    # chmod by name cannot be redirected.
                    os.chmod(entry.name, sanitize_mode(perm), dir_fd=fd)
        finally:
            os.close(fd)
    return removed, changed


def resolve_mount_point(
    root_fd: int, point: str, *, create: bool, owner: tuple[int, int] | None
) -> None:
    """Make sure ``point`` (a path inside the image, like "/data") exists.

    Relative symlinks are followed as long as they stay inside the root;
    absolute ones are refused, because ``ch-run -b`` mounts onto the host-side
    path and the kernel would resolve them against the host's root. With
    ``create`` missing directories are made; without it (a read-only image)
    a missing mount point is an error.
    """
    what = f"mount point {point!r}"
    pending = list(split_inside(point, what))
    if not pending:
        raise StageError(f"refusing {what}: cannot bind over the image's root")
    stack: list[int] = []
    hops = 0
    try:
        while pending:
            name = pending.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if not stack:
                    raise StageError(f"refusing {what}: a symlink in it leaves the image")
                os.close(stack.pop())
                continue
            cur = stack[-1] if stack else root_fd
            try:
                st = os.lstat(name, dir_fd=cur)
            except FileNotFoundError:
                if not create:
                    raise StageError(
                        f"image lacks mount point {point!r}: ch-run -b needs it to exist in a "
                        "read-only image (add it to the image, or stage with method='unsquashfs')"
                    ) from None
                os.mkdir(name, IMPLIED_DIR_MODE, dir_fd=cur)
                # Explicitly, as mkdir's mode is cut by the umask (0077 would
                # lock the job's user out); just made in a private tree, so
                # chmod by name cannot be redirected.
                os.chmod(name, IMPLIED_DIR_MODE, dir_fd=cur)
                if owner is not None:
                    os.chown(name, *owner, dir_fd=cur, follow_symlinks=False)
                st = os.lstat(name, dir_fd=cur)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                target = os.readlink(name, dir_fd=cur)
                if target.startswith("/"):
                    raise StageError(
                        f"refusing {what}: it goes through absolute symlink {name!r} -> "
                        f"{target!r}, which would be resolved on the host"
                    )
                if hops > MAX_SYMLINK_HOPS:
                    raise StageError(f"refusing {what}: too many levels of symlinks")
                pending[:0] = target.split("/")
                continue
            if not pending and stat.S_ISREG(st.st_mode):
                return  # a file can be the target of a bind mount too
            if not stat.S_ISDIR(st.st_mode):
                raise StageError(f"refusing {what}: {name!r} is not a directory")
            stack.append(open_child_dir(cur, name, (name,), what))
    finally:
        for fd in stack:
            os.close(fd)
