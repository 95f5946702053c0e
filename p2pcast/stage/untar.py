"""Unpacking a tar image (plain, gzip or zstd) into a directory, defensively.

Policy and mechanism are separate. ``member_policy`` applies the rules of
``tarfile.tar_filter`` (strip a leading "/", stay inside the destination, no
setuid/setgid/sticky or group/other write) plus ours (no device nodes or
FIFOs, hard links only to earlier members). It needs none of tarfile's
extraction-filter API, which Debian 12's Python 3.11.2 lacks (it came in
3.11.4), so staging runs on the Python that also has Debian's librados.

The extractor does not use ``TarFile.extract``: it writes each admitted member
through directory fds with O_NOFOLLOW (see ``tree``), refusing any member whose
path goes through a symlink. That is stricter than tar_filter's realpath()
check, which 3.11.7 lets symlink chains longer than PATH_MAX bypass
(CVE-2025-4517) and which costs an lstat per path component per member (43%
of the time for a 65k-file tree), so the extractor does not call it. A stream
also cannot seek back, which TarFile needs for hard links.

The archive is read as a stream ("r|"), so a 20 GB image never sits in memory,
and zstd is decoded with ``zstandard``'s stream reader.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gzip
import logging
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Self, cast

import zstandard

from p2pcast.errors import BadImageFile, StageError
from p2pcast.stage.scratch import check_dest_free, private_workdir, publish
from p2pcast.stage.tree import (
    IMPLIED_DIR_MODE,
    DirCache,
    Parts,
    clear_entry,
    open_dir_in,
    sanitize_mode,
    split_inside,
)

log = logging.getLogger(__name__)

TAR_TYPES = ("tar", "tar.gz", "tar.zst")

#: Read size when copying a member's data: large enough that the syscall cost
#: is noise next to the copy, small enough to stay in L2-ish cache sizes.
COPY_CHUNK = 1024 * 1024

#: Skipped members (devices, FIFOs) logged one by one; the rest are only
#: counted, so a hostile archive of a million FIFOs cannot flood the log.
MAX_LOGGED_SKIPS = 10

#: Reasons a write fails because the destination filesystem is full.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class ExtractReport:
    """What an extraction did, for logs and the daemon's status."""

    members: int = 0  #: headers read
    extracted: int = 0  #: files, directories and links written
    skipped: int = 0  #: device nodes, FIFOs and unknown types not created
    modes_cleared: int = 0  #: setuid/setgid/sticky or group/other write removed
    bytes_written: int = 0

    @property
    def neutralised(self) -> int:
        return self.skipped + self.modes_cleared


class _TarFile(tarfile.TarFile):
    members: list[tarfile.TarInfo]  # set by TarFile.__init__; absent from typeshed

    #: Set when the end-of-archive zero block was read. tarfile stops quietly
    #: at EOF or at a garbled header after the first member, which would make a
    #: truncated image look complete; the missing marker is how we notice.
    saw_end_marker = False


class _TarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            # EOFHeaderError (an all-zero block) is not in typeshed.
            if type(exc).__name__ == "EOFHeaderError" and isinstance(tarfile_, _TarFile):
                tarfile_.saw_end_marker = True
            raise


def _refusal(member: tarfile.TarInfo, why: str) -> StageError:
    return StageError(f"refusing member {member.name!r}: {why}")


def is_special(member: tarfile.TarInfo) -> bool:
    """Devices, FIFOs and unknown types: never created, only counted."""
    return not (member.isreg() or member.isdir() or member.issym() or member.islnk())


def member_policy(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """What ``member`` may become: tar_filter's rules, applied lexically, plus ours.

    Returns the member to write (normalised name without leading "/",
    sanitised mode), or None for a member to skip (device node, FIFO). Raises
    StageError naming a member that must not be extracted at all. Symlinks may
    point anywhere (a rootfs is full of absolute ones); never writing
    *through* one is the extractor's job.
    """
    if is_special(member):
        return None
    what = f"member {member.name!r}"
    name = "/".join(split_inside(member.name, what)) or "."
    linkname = member.linkname
    if member.islnk():
        # tar_filter does not look at hard link targets at all; TarFile would
        # link to os.path.join(dest, "/etc/passwd") == "/etc/passwd".
        target = split_inside(member.linkname, what)
        if not target:
            raise _refusal(member, "hard link to the destination directory itself")
        linkname = "/".join(target)
    # A shallow copy: TarInfo.replace() only exists from Python 3.11.4 on.
    admitted = copy.copy(member)
    admitted.name, admitted.mode, admitted.linkname = name, sanitize_mode(member.mode), linkname
    return admitted


def _open_source(
    source: str | os.PathLike[str] | BinaryIO, image_type: str
) -> tuple[IO[bytes], list[IO[bytes]], str]:
    """Return (decompressed stream, things to close, display name)."""
    if image_type not in TAR_TYPES:
        raise BadImageFile(f"unknown tar image type {image_type!r}; expected one of {TAR_TYPES}")
    closers: list[IO[bytes]] = []
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            raw: IO[bytes] = open(name, "rb")  # noqa: SIM115 - closed by the caller via closers
        except OSError as exc:
            raise StageError(f"cannot open image {name}: {exc.strerror}") from exc
        closers.append(raw)
    else:
        raw = source
        name = str(getattr(source, "name", "<stream>"))
    if image_type == "tar.gz":
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        closers.insert(0, stream)
    elif image_type == "tar.zst":
        # read_across_frames: pzstd and `zstd -T` can write several frames.
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False
        )
        stream = reader
        closers.insert(0, reader)
    else:
        stream = raw
    return stream, closers, name


def extract_tar_into(
    source: str | os.PathLike[str] | BinaryIO,
    image_type: str,
    root: Path,
    *,
    owner: tuple[int, int] | None = None,
    space_on: Path | None = None,
) -> ExtractReport:
    """Extract into ``root``, a new directory this call creates (mode 0700).

    The caller owns cleanup: on error ``root`` may hold a partial tree.
    ``space_on`` names the filesystem in a "no space left" error.
    """
    stream, closers, name = _open_source(source, image_type)
    report = ExtractReport()
    current = "<first header>"  # the member being unpacked, for error messages
    try:
        os.mkdir(root, 0o700)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if owner is not None:
                os.fchown(root_fd, *owner)
            cache = DirCache(root_fd, owner)
            # The root stays 0700 while unpacking; a "./" member may override this.
            cache.dir_modes[()] = (IMPLIED_DIR_MODE, None)
            try:
                with _TarFile.open(fileobj=stream, mode="r|", tarinfo=_TarInfo) as tf:
                    while (member := tf.next()) is not None:
                        current = member.name
                        _extract_member(tf, member, cache, report)
                        # TarFile remembers every member it has read; a stream
                        # never needs them again, and a rootfs has 100k+.
                        tf.members.clear()
                    if not isinstance(tf, _TarFile) or not tf.saw_end_marker:
                        raise StageError(
                            f"corrupt or truncated tar archive {name}: it ends after "
                            f"member {current!r} without an end-of-archive marker"
                        )
                    current = "<after the end-of-archive marker>"
                _drain(stream)
                cache.finalize()
            finally:
                cache.close()
        finally:
            os.close(root_fd)
    except StageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as exc:
        raise StageError(f"corrupt or truncated tar archive {name}: {exc}") from exc
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            where = space_on or root.parent
            raise StageError(
                f"no space left on {where} while unpacking {name} (member {current!r})"
            ) from exc
        raise StageError(f"cannot unpack {name} (member {current!r}): {exc}") from exc
    finally:
        for closer in closers:
            closer.close()
    return report


def _drain(stream: IO[bytes]) -> None:
    # Reading past the end-of-archive marker to EOF makes gzip check its CRC
    # and length trailer (BadGzipFile/EOFError on a damaged or cut file).
    while stream.read(COPY_CHUNK):
        pass


def _extract_member(
    tf: tarfile.TarFile, member: tarfile.TarInfo, cache: DirCache, report: ExtractReport
) -> None:
    report.members += 1
    filtered = member_policy(member)
    if filtered is None:
        report.skipped += 1
        if report.skipped <= MAX_LOGGED_SKIPS:
            log.warning(
                "skipped special member %r (device node, FIFO or unknown type)", member.name
            )
        return
    what = f"member {member.name!r}"
    parts = split_inside(filtered.name, what)
    mode = filtered.mode
    if not member.issym() and sanitize_mode(member.mode) != member.mode:
        report.modes_cleared += 1
    mtime = float(member.mtime) if isinstance(member.mtime, int | float) else None
    owner = cache.owner

    if filtered.isdir():
        if parts:
            parent = cache.get(parts[:-1], what)
            _ensure_dir(parent, parts[-1], what, owner)
        cache.dir_modes[parts] = (mode, mtime)
        report.extracted += 1
        return
    if not parts:
        raise _refusal(member, "a non-directory cannot replace the destination itself")

    if filtered.islnk():
        _make_hardlink(filtered, parts, cache, what)
        report.extracted += 1
        return

    parent = cache.get(parts[:-1], what)
    leaf = parts[-1]
    clear_entry(parent, leaf, what)
    if filtered.issym():
        os.symlink(filtered.linkname, leaf, dir_fd=parent)
        if owner is not None:
            os.chown(leaf, *owner, dir_fd=parent, follow_symlinks=False)
        report.extracted += 1
        return

    fd = os.open(
        leaf,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=parent,
    )
    try:
        data = tf.extractfile(member)
        if data is not None:
            while chunk := data.read(COPY_CHUNK):
                report.bytes_written += _write_all(fd, chunk)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        if mtime is not None:
            # An absurd mtime is not worth failing a job for.
            with contextlib.suppress(OverflowError, ValueError):
                os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)
    report.extracted += 1


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _ensure_dir(parent: int, leaf: str, what: str, owner: tuple[int, int] | None) -> None:
    try:
        st = os.lstat(leaf, dir_fd=parent)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            return
        os.unlink(leaf, dir_fd=parent)  # a file or symlink is replaced, not followed
    os.mkdir(leaf, 0o700, dir_fd=parent)
    if owner is not None:
        os.chown(leaf, *owner, dir_fd=parent, follow_symlinks=False)


def _make_hardlink(filtered: tarfile.TarInfo, parts: Parts, cache: DirCache, what: str) -> None:
    target = tuple(filtered.linkname.split("/"))
    if target == parts:
        return  # a link to itself: the file is already there
    missing = StageError(
        f"refusing {what}: hard link target {filtered.linkname!r} "
        "is not an earlier member of the archive"
    )
    # Resolve the target without following symlinks, so "x/passwd" with
    # x -> /etc is refused instead of linking the host's file.
    try:
        tparent = open_dir_in(cache.root_fd, target[:-1], f"{what} (hard link target)")
    except FileNotFoundError:
        raise missing from None
    try:
        try:
            st = os.lstat(target[-1], dir_fd=tparent)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise StageError(f"refusing {what}: hard link to directory {filtered.linkname!r}")
        parent = cache.get(parts[:-1], what)
        clear_entry(parent, parts[-1], what)
        # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links a
        # symlink itself, never the file it points to.
        os.link(target[-1], parts[-1], src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(tparent)


def safe_extract_tar(
    fileobj_or_path: str | os.PathLike[str] | BinaryIO,
    image_type: str,
    dest: str | os.PathLike[str],
    *,
    owner: tuple[int, int] | None = None,
) -> ExtractReport:
    """Extract a tar image into ``dest`` (absent or an empty directory).

    ``owner`` (uid, gid) receives every extracted entry (the job's user, when
    the prolog stages as root); by default they belong to the caller, never to
    the uids recorded in the archive. On any error nothing is left at ``dest``
    beyond what was there before, and no scratch directory remains.
    """
    dest = Path(os.path.abspath(dest))
    check_dest_free(dest)
    with private_workdir(dest) as work:
        root = work / "rootfs"
        report = extract_tar_into(
            fileobj_or_path, image_type, root, owner=owner, space_on=dest.parent
        )
        publish(root, dest)
    log.info(
        "unpacked %d members into %s (%d skipped, %d modes cleared)",
        report.extracted,
        dest,
        report.skipped,
        report.modes_cleared,
    )
    return report
