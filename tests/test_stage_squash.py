"""Staging SquashFS images by kernel mount, squashfuse and unsquashfs, for real."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast.errors import ConfigError, StageError
from p2pcast.stage import StagedImage, stage_image, unstage_path
from p2pcast.stage.mounts import find_tool
from tests.test_stage_support import (
    build_squashfs,
    is_root,
    leftovers,
    mount_guard,
    need,
    need_tool,
    proc_mounts_under,
    run_as,
    tmpfs,
)

MOUNT_METHODS = ["kernel-mount", "squashfuse"]
ALL_METHODS = [*MOUNT_METHODS, "unsquashfs"]


def need_method(method: str) -> None:
    """Skip (or, under CI, fail) when ``method`` cannot run on this machine."""
    if method == "kernel-mount":
        need(is_root(), "root (for a kernel loop mount)")
        need(os.path.exists("/dev/loop-control"), "loop devices")
    elif method == "squashfuse":
        need(find_tool("squashfuse_ll", "squashfuse") is not None, "squashfuse (apt squashfuse)")
        need(os.path.exists("/dev/fuse"), "/dev/fuse (apt fuse3)")
        need(find_tool("fusermount3", "fusermount") is not None or is_root(), "fusermount3")
    else:
        need_tool("unsquashfs", "squashfs-tools")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    with mount_guard(tmp_path):
        yield tmp_path


@pytest.fixture
def image(scratch: Path) -> Path:
    src = scratch / "src"
    (src / "etc").mkdir(parents=True)
    (src / "data").mkdir()
    (src / "etc/os-release").write_text("ID=squash\n")
    (src / "payload.bin").write_bytes(os.urandom(256 * 1024))  # tables land past 256 KiB
    (src / "lib").symlink_to("usr/lib")
    (src / "usr/lib").mkdir(parents=True)
    return build_squashfs(src, scratch / "image.sqfs")


def assert_clean(dest: Path) -> None:
    assert proc_mounts_under(dest) == []
    assert not dest.exists()
    assert leftovers(dest.parent, dest.name) == []


@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_method_stages_and_unstages(scratch: Path, image: Path, method: str) -> None:
    need_method(method)
    dest = scratch / "staged" / "img"
    staged = stage_image(image, "squashfs", dest, method=method)
    try:
        assert staged == StagedImage(dest, method, image)
        assert (dest / "etc/os-release").read_text() == "ID=squash\n"
        assert os.readlink(dest / "lib") == "usr/lib"
        mounted = proc_mounts_under(dest)
        assert mounted == ([str(dest)] if method in MOUNT_METHODS else [])
        if method in MOUNT_METHODS:
            with pytest.raises(OSError):  # read-only, as ch-run expects
                (dest / "new").write_text("x")
    finally:
        staged.unstage()
    staged.unstage()  # twice without harm
    assert_clean(dest)


def test_auto_prefers_the_kernel_mount_as_root(scratch: Path, image: Path) -> None:
    need_method("kernel-mount")
    dest = scratch / "img"
    staged = stage_image(image, "squashfs", dest)
    try:
        assert staged.method == "kernel-mount"
        assert (dest / "etc/os-release").exists()
    finally:
        unstage_path(dest)
    assert_clean(dest)


@pytest.mark.parametrize("method", MOUNT_METHODS)
def test_record_from_a_state_file_unstages_a_mount(scratch: Path, image: Path, method: str) -> None:
    need_method(method)
    dest = scratch / "img"
    record = stage_image(image, "squashfs", dest, method=method).to_dict()
    reloaded = StagedImage.from_dict(record)  # as after a daemon restart
    reloaded.unstage()
    reloaded.unstage()
    assert_clean(dest)


@pytest.mark.parametrize("method", MOUNT_METHODS)
def test_busy_mount_is_detached_lazily(scratch: Path, image: Path, method: str) -> None:
    need_method(method)
    dest = scratch / "img"
    stage_image(image, "squashfs", dest, method=method)
    with open(dest / "etc/os-release") as busy:  # keeps the filesystem busy
        unstage_path(dest)
        assert_clean(dest)
        assert busy.read() == "ID=squash\n"  # the open file still works after detaching


def test_mount_of_a_dead_squashfuse_is_removed(scratch: Path, image: Path) -> None:
    """An OOM-killed FUSE daemon leaves "Transport endpoint is not connected" behind."""
    need_method("squashfuse")
    need(is_root(), "root (to unmount another process's FUSE mount)")
    dest = scratch / "img"
    stage_image(image, "squashfs", dest, method="squashfuse")
    daemons = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
            if str(dest).encode() in argv and b"squashfuse" in argv[0]:
                daemons.append(int(pid))
    assert len(daemons) == 1, daemons  # the daemon this test started, found by its dest
    os.kill(daemons[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.listdir(dest)
        except OSError as exc:
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        time.sleep(0.05)
    unstage_path(dest)
    assert_clean(dest)


def _garble(good: Path, out: Path) -> Path:
    data = bytearray(good.read_bytes())
    for i in range(96, len(data)):  # keep the 96-byte superblock, ruin the rest
        data[i] ^= 0x5A
    out.write_bytes(bytes(data))
    return out


def _truncate(good: Path, out: Path) -> Path:
    out.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return out


def _garbage(good: Path, out: Path) -> Path:
    out.write_bytes(os.urandom(good.stat().st_size))
    return out


@pytest.mark.parametrize("method", [*ALL_METHODS, "auto"])
@pytest.mark.parametrize("damage", [_garble, _truncate, _garbage])
def test_corrupt_image_leaves_nothing(
    scratch: Path, image: Path, method: str, damage: object
) -> None:
    if method == "auto":
        need_method("unsquashfs")
    else:
        need_method(method)
    assert callable(damage)
    bad = damage(image, scratch / "bad.sqfs")
    dest = scratch / "img"
    with pytest.raises(StageError, match="cannot stage") as info:
        stage_image(bad, "squashfs", dest, method=method)
    message = str(info.value)
    assert "\n" not in message
    assert_clean(dest)


def test_existing_empty_destination_is_kept_on_failure(scratch: Path, image: Path) -> None:
    need_method("unsquashfs")
    dest = scratch / "img"
    dest.mkdir()
    bad = _garbage(image, scratch / "bad.sqfs")
    with pytest.raises(StageError):
        stage_image(bad, "squashfs", dest, method="auto")
    assert dest.is_dir() and os.listdir(dest) == []
    assert proc_mounts_under(dest) == []
    staged = stage_image(image, "squashfs", dest, method="unsquashfs")
    assert (dest / "etc/os-release").exists()
    staged.unstage()
    assert_clean(dest)


def test_unsquashfs_neutralises_special_files(scratch: Path) -> None:
    need_method("unsquashfs")
    src = scratch / "src"
    src.mkdir()
    (src / "plain").write_text("p\n")
    image = build_squashfs(
        src,
        scratch / "special.sqfs",
        [
            "-p", "null c 666 root root 1 3",
            "-p", "disk b 660 root root 8 0",
            "-p", "pipe i 644 root root f",
            "-p", "sock i 644 root root s",
            "-p", "suid f 4755 1234 1234 echo hi",
            "-p", "tmp d 1777 root root",
        ],
    )  # fmt: skip
    dest = scratch / "img"
    staged = stage_image(image, "squashfs", dest, method="unsquashfs")
    try:
        assert sorted(os.listdir(dest)) == ["plain", "suid", "tmp"]
        assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
        assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o755
        for path in [dest, dest / "plain", dest / "suid", dest / "tmp"]:
            assert (path.stat().st_uid, path.stat().st_gid) == (os.geteuid(), os.getegid())
    finally:
        staged.unstage()
    assert_clean(dest)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_existing_mount_point_is_accepted(scratch: Path, image: Path, method: str) -> None:
    need_method(method)
    dest = scratch / "img"
    staged = stage_image(image, "squashfs", dest, method=method, mount_points=["/data", "/etc"])
    staged.unstage()
    assert_clean(dest)


@pytest.mark.parametrize("method", MOUNT_METHODS)
def test_read_only_image_lacking_a_mount_point_is_refused(
    scratch: Path, image: Path, method: str
) -> None:
    need_method(method)
    dest = scratch / "img"
    with pytest.raises(StageError, match="image lacks mount point '/scratch'"):
        stage_image(image, "squashfs", dest, method=method, mount_points=["/data", "/scratch"])
    assert_clean(dest)


def test_auto_does_not_fall_back_to_unsquashfs_for_a_missing_mount_point(
    scratch: Path, image: Path
) -> None:
    need_method("kernel-mount")
    dest = scratch / "img"
    with pytest.raises(StageError, match="lacks mount point"):
        stage_image(image, "squashfs", dest, mount_points=["/scratch"])
    assert_clean(dest)


def test_unsquashfs_creates_missing_mount_points(scratch: Path, image: Path) -> None:
    need_method("unsquashfs")
    dest = scratch / "img"
    points = ["/scratch", "/deep/er/point", "/lib/modules"]
    staged = stage_image(image, "squashfs", dest, method="unsquashfs", mount_points=points)
    try:
        assert (dest / "scratch").is_dir()
        assert (dest / "deep/er/point").is_dir()
        assert (dest / "usr/lib/modules").is_dir()  # through the relative symlink lib -> usr/lib
    finally:
        staged.unstage()
    assert_clean(dest)


def test_unsquashfs_on_a_full_disk_leaves_nothing(scratch: Path) -> None:
    need_method("unsquashfs")
    src = scratch / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    image = build_squashfs(src, scratch / "big.sqfs")
    with tmpfs(scratch / "small", "1m") as small:
        dest = small / "img"
        with pytest.raises(StageError, match=r"no space left on .*small while unsquashing"):
            stage_image(image, "squashfs", dest, method="unsquashfs")
        assert os.listdir(small) == []


def test_untar_method_cannot_stage_squashfs(scratch: Path, image: Path) -> None:
    with pytest.raises(ConfigError):
        stage_image(image, "squashfs", scratch / "img", method="untar")


def test_forced_method_that_is_missing_says_so(
    scratch: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(scratch / "empty-bin"))
    monkeypatch.setattr("p2pcast.stage.mounts.SYSTEM_PATH", str(scratch / "empty-bin"))
    with pytest.raises(StageError, match="with squashfuse: neither squashfuse_ll nor squashfuse"):
        stage_image(image, "squashfs", scratch / "img", method="squashfuse")
    assert_clean(scratch / "img")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-readable directory (pytest's tmp_path is root-only) with a mount guard."""
    base = Path(tempfile.mkdtemp(prefix="p2pcast-stage-"))
    try:
        with mount_guard(base):
            base.chmod(0o755)
            yield base
    finally:
        unstage_path(base / "work")
        shutil.rmtree(base)


@pytest.mark.parametrize("method", ["unsquashfs", "auto"])
def test_unprivileged_staging(shared_dir: Path, method: str) -> None:
    """Without root: no loop mount, devices cannot be made, FUSE may be closed to us."""
    need_method("unsquashfs")
    src = shared_dir / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/os-release").write_text("ID=squash\n")
    image = build_squashfs(
        src, shared_dir / "dev.sqfs", ["-p", "null c 666 root root 1 3", "-p", "p i 644 0 0 f"]
    )
    image.chmod(0o644)
    work = shared_dir / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    dest = work / "img"

    def as_nobody() -> None:
        staged = stage_image(image, "squashfs", dest, method=method)
        assert staged.method in ("squashfuse", "unsquashfs")  # never kernel-mount
        assert (dest / "etc/os-release").read_text() == "ID=squash\n"
        if staged.method == "unsquashfs":
            assert sorted(os.listdir(dest)) == ["etc"]
        staged.unstage()
        staged.unstage()
        assert not dest.exists()

    run_as(65534, 65534, as_nobody)
    assert_clean(dest)
