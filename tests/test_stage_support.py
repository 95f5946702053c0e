"""Helpers for the stage tests: archive builders, tool checks, a mount guard.

Holds no tests. Real tools and real mounts are used; a test may skip for a
missing tool or privilege only when CI is unset (CI installs everything and
runs as root, so there a missing piece is a failure).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import zstandard

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def need(available: bool, what: str) -> None:
    """Skip without ``what``, unless CI is set: then its absence is a failure."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required when CI is set")
    pytest.skip(f"{what} is not available here")


def is_root() -> bool:
    return os.geteuid() == 0


def tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)


def need_tool(name: str, package: str) -> str:
    found = tool(name)
    need(found is not None, f"{name} (apt package {package})")
    assert found is not None
    return found


def proc_mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, read from /proc/mounts."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split(" ")[1])
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return found


@contextlib.contextmanager
def mount_guard(path: Path) -> Iterator[None]:
    """Fail the test if it leaves a mount below ``path``, after removing it."""
    try:
        yield
    finally:
        left = proc_mounts_under(path)
        for point in sorted(left, key=len, reverse=True):
            subprocess.run(
                [tool("umount") or "umount", "-l", point], check=False, capture_output=True
            )
        if left:
            pytest.fail(f"test left mounts behind: {left}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (root only), always unmounted afterwards."""
    need(is_root(), "root (to mount a tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [tool("mount") or "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        if str(path) in proc_mounts_under(path):  # the code under test may have done it
            subprocess.run([tool("umount") or "umount", "-l", str(path)], check=True)


# -- archives ---------------------------------------------------------------


def add_file(tf: tarfile.TarFile, name: str, data: bytes = b"x", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tf.addfile(info, io.BytesIO(data))


def add_entry(
    tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "", mode: int = 0o755
) -> None:
    """Add a member with no data: a directory, link, device node or FIFO."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    tf.addfile(info)


def write_tar(
    path: Path, build: Callable[[tarfile.TarFile], None], image_type: str = "tar"
) -> Path:
    """Write a tar built by ``build``, compressed as ``image_type`` says."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    path.write_bytes(compress(raw.getvalue(), image_type))
    return path


def tar_of_dir(path: Path, src: Path, image_type: str) -> Path:
    """A tar of a real directory tree, like `tar -C src -cf path .`."""
    return write_tar(path, lambda tf: tf.add(src, arcname="."), image_type)


def compress(data: bytes, image_type: str) -> bytes:
    if image_type == "tar.gz":
        return gzip.compress(data)
    if image_type == "tar.zst":
        return zstandard.ZstdCompressor().compress(data)
    assert image_type == "tar"
    return data


def build_squashfs(src: Path, out: Path, extra: Sequence[str] = ()) -> Path:
    mksquashfs = need_tool("mksquashfs", "squashfs-tools")
    subprocess.run(
        [mksquashfs, str(src), str(out), "-noappend", "-quiet", "-no-progress", *extra],
        check=True,
        capture_output=True,
    )
    return out


def run_as(uid: int, gid: int, func: Callable[[], None]) -> None:
    """Run ``func`` in a forked child with the given ids; re-raise its failure here.

    A fork rather than a new interpreter: the modules are already imported, so
    the child needs no read access to where Python and its packages live.
    """
    need(is_root(), "root (to switch to another user)")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            func()
            status = 0
        except BaseException:
            os.write(write_fd, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.fail(f"as uid {uid}: {report}")


def leftovers(parent: Path, name: str) -> list[str]:
    """Entries in ``parent`` that staging ``name`` could have left behind."""
    if not parent.exists():
        return []
    return sorted(p for p in os.listdir(parent) if p == name or p.startswith(f".{name}."))
