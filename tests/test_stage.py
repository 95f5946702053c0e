"""stage_image's contract, mount points in unpacked images, and unstaging."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast.errors import BadImageFile, ConfigError, StageError
from p2pcast.stage import StagedImage, safe_extract_tar, stage_image, unstage_path
from p2pcast.stage.remove import remove_tree
from p2pcast.stage.tree import MAX_PATH_DEPTH
from tests.test_stage_support import (
    add_entry,
    add_file,
    is_root,
    leftovers,
    mount_guard,
    need,
    proc_mounts_under,
    run_as,
    tmpfs,
    write_tar,
)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    with mount_guard(tmp_path):
        yield tmp_path


@pytest.fixture
def rootfs_tar(scratch: Path) -> Path:
    def build(tf: tarfile.TarFile) -> None:
        add_entry(tf, "./", tarfile.DIRTYPE)
        add_file(tf, "etc/hostname", b"node\n")
        add_entry(tf, "usr/lib", tarfile.DIRTYPE)
        add_entry(tf, "lib", tarfile.SYMTYPE, linkname="usr/lib")
        add_entry(tf, "data", tarfile.DIRTYPE)

    return write_tar(scratch / "rootfs.tar", build)


def assert_nothing_staged(dest: Path) -> None:
    assert not os.path.lexists(dest)
    assert leftovers(dest.parent, dest.name) == []


# -- the record --------------------------------------------------------------------


def test_record_round_trips() -> None:
    staged = StagedImage(Path("/tmp/x/img"), "squashfuse", Path("/cache/a.sqfs"))
    assert StagedImage.from_dict(staged.to_dict()) == staged


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"path": "/x", "method": "teleport", "image_path": "/i"},
        {"path": 3, "method": "untar", "image_path": "/i"},
    ],
)
def test_malformed_record_is_a_stage_error(record: dict[str, object]) -> None:
    with pytest.raises(StageError, match="malformed staging record"):
        StagedImage.from_dict(record)


def test_loaded_record_unstages_an_unpacked_tree(scratch: Path, rootfs_tar: Path) -> None:
    dest = scratch / "img"
    record = stage_image(rootfs_tar, "tar", dest).to_dict()
    StagedImage.from_dict(record).unstage()
    StagedImage.from_dict(record).unstage()
    assert_nothing_staged(dest)


# -- arguments ------------------------------------------------------------------------


def test_unknown_image_type(scratch: Path, rootfs_tar: Path) -> None:
    with pytest.raises(BadImageFile, match="unknown image type 'zip'"):
        stage_image(rootfs_tar, "zip", scratch / "img")


@pytest.mark.parametrize("method", ["teleport", "kernel-mount", "squashfuse", "unsquashfs"])
def test_method_that_cannot_stage_a_tar(scratch: Path, rootfs_tar: Path, method: str) -> None:
    with pytest.raises(ConfigError):
        stage_image(rootfs_tar, "tar", scratch / "img", method=method)
    assert_nothing_staged(scratch / "img")


def test_missing_image(scratch: Path) -> None:
    with pytest.raises(StageError, match="not a readable file"):
        stage_image(scratch / "nope.tar", "tar", scratch / "img")


def test_occupied_destination_is_refused_and_untouched(scratch: Path, rootfs_tar: Path) -> None:
    dest = scratch / "img"
    dest.mkdir()
    (dest / "precious").write_text("keep")
    with pytest.raises(StageError, match="exists and is not an empty directory"):
        stage_image(rootfs_tar, "tar", dest)
    assert (dest / "precious").read_text() == "keep"
    link = scratch / "link"
    link.symlink_to(scratch / "elsewhere")
    with pytest.raises(StageError, match="exists and is not an empty directory"):
        stage_image(rootfs_tar, "tar", link)
    assert not (scratch / "elsewhere").exists()


def test_empty_destination_is_used(scratch: Path, rootfs_tar: Path) -> None:
    dest = scratch / "img"
    dest.mkdir()
    staged = stage_image(rootfs_tar, "tar", dest)
    assert (dest / "etc/hostname").read_text() == "node\n"
    staged.unstage()
    assert_nothing_staged(dest)


# -- mount points in an unpacked image ------------------------------------------------------


def test_mount_points_are_created(scratch: Path, rootfs_tar: Path) -> None:
    dest = scratch / "img"
    points = ["/data", "/scratch", "/a/b/c", "/lib/modules", "/etc/hostname", "relative/ok"]
    old_umask = os.umask(0o077)  # modes must not depend on the prolog's umask
    try:
        staged = stage_image(rootfs_tar, "tar", dest, mount_points=points)
    finally:
        os.umask(old_umask)
    try:
        assert oct(dest.stat().st_mode & 0o777) == oct(0o755)
        assert oct((dest / "etc/hostname").stat().st_mode & 0o777) == oct(0o644)
        for rel in ["data", "scratch", "a/b/c", "usr/lib/modules", "relative/ok"]:
            assert (dest / rel).is_dir(), rel
            assert oct((dest / rel).stat().st_mode & 0o777) == oct(0o755)
        assert (dest / "etc/hostname").read_text() == "node\n"  # a file is a valid target
    finally:
        staged.unstage()


def test_mount_points_belong_to_the_owner(scratch: Path, rootfs_tar: Path) -> None:
    need(is_root(), "root (to give files to another user)")
    dest = scratch / "img"
    staged = stage_image(rootfs_tar, "tar", dest, mount_points=["/x/y"], owner=(65534, 65534))
    try:
        assert (dest / "x").stat().st_uid == (dest / "x/y").stat().st_uid == 65534
    finally:
        staged.unstage()


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("/../etc/escape", "leaves the destination"),
        ("/", "cannot bind over the image's root"),
        ("/host/p2pcast-escape", "absolute symlink 'host'"),
        ("/up/p2pcast-escape", "a symlink in it leaves the image"),
        ("/loop/x", "too many levels of symlinks"),
        ("/etc/hostname/x", "'hostname' is not a directory"),
    ],
)
def test_bad_mount_points_are_refused(scratch: Path, point: str, message: str) -> None:
    hostdir = scratch / "hostdir"
    hostdir.mkdir()

    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "etc/hostname", b"node\n")
        add_entry(tf, "host", tarfile.SYMTYPE, linkname=str(hostdir))
        add_entry(tf, "up", tarfile.SYMTYPE, linkname="../../..")
        add_entry(tf, "loop", tarfile.SYMTYPE, linkname="loop")

    image = write_tar(scratch / "t.tar", build)
    dest = scratch / "jail" / "img"
    with pytest.raises(StageError, match=message):
        stage_image(image, "tar", dest, mount_points=["/fine", point])
    assert os.listdir(hostdir) == []
    assert not (scratch / "p2pcast-escape").exists()
    assert not (scratch / "jail/p2pcast-escape").exists()
    assert_nothing_staged(dest)


# -- unstage_path ---------------------------------------------------------------------------


def test_unstage_missing_path_is_fine(scratch: Path) -> None:
    unstage_path(scratch / "never-staged")
    unstage_path(scratch / "no-parent" / "never-staged")


def test_unstage_refuses_paths_near_the_root() -> None:
    for path in ["/", "/tmp", "/home"]:
        with pytest.raises(StageError, match="too close to the root"):
            unstage_path(path)


def test_unstage_removes_a_symlink_not_its_target(scratch: Path) -> None:
    target = scratch / "target"
    target.mkdir()
    (target / "file").write_text("keep")
    link = scratch / "img"
    link.symlink_to(target)
    unstage_path(link)
    assert not os.path.lexists(link)
    assert (target / "file").read_text() == "keep"


def test_unstage_never_follows_symlinks_inside(scratch: Path) -> None:
    outside = scratch / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub/file").write_text("keep")
    dest = scratch / "img"
    (dest / "deep/ro").mkdir(parents=True)
    (dest / "deep/ro/file").write_text("x")
    (dest / "deep/ro").chmod(0o555)
    (dest / "abs").symlink_to(outside)
    (dest / "deep/rel").symlink_to("../../outside/sub")
    (dest / "deep/file-link").symlink_to(outside / "sub/file")
    unstage_path(dest)
    unstage_path(dest)
    assert not dest.exists()
    assert (outside / "sub/file").read_text() == "keep"


def test_unstage_removes_scratch_of_a_killed_staging(scratch: Path) -> None:
    outside = scratch / "outside"
    outside.mkdir()
    (outside / "file").write_text("keep")
    parent = scratch / "job"
    (parent / ".img.staging-abc123/rootfs/etc").mkdir(parents=True)
    (parent / ".img.staging-abc123/rootfs/etc/passwd").write_text("x")
    (parent / ".img.staging-link").symlink_to(outside)
    (parent / ".other.staging-x").mkdir()  # another image's: not ours to remove
    unstage_path(parent / "img")
    assert os.listdir(parent) == [".other.staging-x"]
    assert (outside / "file").read_text() == "keep"


def test_unstage_unmounts_nested_mounts(scratch: Path) -> None:
    dest = scratch / "img"
    (dest / "inner").mkdir(parents=True)
    with tmpfs(dest / "inner", "1m") as inner:
        (inner / "data").mkdir()
        with tmpfs(inner / "data", "1m"):
            unstage_path(dest)
            assert proc_mounts_under(dest) == []
            assert not dest.exists()


def test_removal_never_crosses_into_another_filesystem(scratch: Path) -> None:
    dest = scratch / "img"
    (dest / "mnt").mkdir(parents=True)
    with tmpfs(dest / "mnt", "1m") as mnt:
        (mnt / "precious").write_text("keep")
        with pytest.raises(StageError, match="another filesystem is mounted there"):
            remove_tree(dest)
        assert (mnt / "precious").read_text() == "keep"
    unstage_path(dest)
    assert not dest.exists()


def test_deep_trees_do_not_recurse(scratch: Path) -> None:
    depth = MAX_PATH_DEPTH - 1
    name = "/".join(["d"] * depth) + "/leaf"
    image = write_tar(scratch / "deep.tar", lambda tf: add_file(tf, name, b"deep"))
    dest = scratch / "img"
    safe_extract_tar(image, "tar", dest)
    assert (dest / name).read_bytes() == b"deep"
    unstage_path(dest)
    assert not dest.exists()

    too_deep = "/".join(["d"] * MAX_PATH_DEPTH) + "/leaf"
    image = write_tar(scratch / "deeper.tar", lambda tf: add_file(tf, too_deep, b"x"))
    with pytest.raises(StageError, match="too deep or too long"):
        safe_extract_tar(image, "tar", dest)
    assert_nothing_staged(dest)


# -- without root -------------------------------------------------------------------------------


def test_unprivileged_user_can_stage_and_unstage() -> None:
    """A read-only directory in the image must not make unstaging fail for its owner."""
    need(is_root(), "root (to run as nobody)")
    base = Path(tempfile.mkdtemp(prefix="p2pcast-stage-"))
    try:
        base.chmod(0o755)

        def build(tf: tarfile.TarFile) -> None:
            add_entry(tf, "ro", tarfile.DIRTYPE, mode=0o555)
            add_file(tf, "ro/file", b"f", mode=0o444)
            add_entry(tf, "ro/sub", tarfile.DIRTYPE, mode=0o500)
            add_file(tf, "ro/closed/inner", b"i")
            add_entry(tf, "ro/closed", tarfile.DIRTYPE, mode=0o000)

        image = write_tar(base / "ro.tar", build)
        work = base / "work"
        work.mkdir()
        os.chown(work, 65534, 65534)
        dest = work / "img"

        def as_nobody() -> None:
            staged = stage_image(image, "tar", dest, mount_points=["/data"])
            assert oct((dest / "ro").stat().st_mode & 0o777) == oct(0o555)
            assert (dest / "ro/file").stat().st_uid == 65534
            staged.unstage()
            unstage_path(dest)
            assert not dest.exists()

        run_as(65534, 65534, as_nobody)
        assert os.listdir(work) == []
    finally:
        shutil.rmtree(base)
