"""Unpacking tar images: good archives round-trip, hostile ones do no harm."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcast.errors import BadImageFile, StageError
from p2pcast.stage import ExtractReport, safe_extract_tar, stage_image, unstage_path
from p2pcast.stage.untar import member_policy
from tests.test_stage_support import (
    add_entry,
    add_file,
    is_root,
    leftovers,
    mount_guard,
    need,
    tar_of_dir,
    tmpfs,
    write_tar,
)

TAR_TYPES = ["tar", "tar.gz", "tar.zst"]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    with mount_guard(tmp_path):
        yield tmp_path


def make_rootfs(src: Path) -> None:
    """A small tree with what a real rootfs has: nesting, links, odd modes."""
    (src / "usr/lib").mkdir(parents=True)
    (src / "usr/bin").mkdir()
    (src / "etc/alternatives").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "usr/bin/tool").chmod(0o755)
    (src / "usr/lib/big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (src / "etc/hostname").write_text("node\n")
    (src / "etc/readonly").write_text("ro\n")
    (src / "etc/readonly").chmod(0o444)
    (src / "etc/caf\u00e9 name").write_text("unicode\n")
    os.link(src / "usr/bin/tool", src / "usr/bin/tool-hardlink")
    (src / "lib").symlink_to("usr/lib")  # merged-/usr style, relative
    (src / "etc/alternatives/editor").symlink_to("/usr/bin/vi")  # absolute: allowed
    (src / "etc/dangling").symlink_to("../nowhere")
    (src / "usr/share").mkdir()
    (src / "usr/share").chmod(0o555)  # read-only dir with content below it
    (src / "usr/lib/x").mkdir()


def snapshot(root: Path) -> dict[str, tuple[str, object, int]]:
    """type, content or link target, and permission bits of every entry."""
    out: dict[str, tuple[str, object, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path), 0)
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("file", path.read_bytes(), stat.S_IMODE(st_.st_mode))
    return out


@pytest.mark.parametrize("image_type", TAR_TYPES)
def test_good_archive_round_trips(scratch: Path, image_type: str) -> None:
    src = scratch / "src"
    make_rootfs(src)
    image = tar_of_dir(scratch / f"image.{image_type}", src, image_type)
    dest = scratch / "staged" / "rootfs"
    try:
        report = safe_extract_tar(image, image_type, dest)
        assert snapshot(dest) == snapshot(src)
        tool, twin = dest / "usr/bin/tool", dest / "usr/bin/tool-hardlink"
        assert tool.stat().st_ino == twin.stat().st_ino
        assert report.skipped == 0 and report.modes_cleared == 0
        assert report.extracted == report.members == len(snapshot(src)) + 1  # + "./"
        assert report.bytes_written > 3 * 1024 * 1024
        assert leftovers(dest.parent, "rootfs") == ["rootfs"]
    finally:
        (src / "usr/share").chmod(0o755)
        unstage_path(dest)
    assert not dest.exists()


@pytest.mark.parametrize("image_type", TAR_TYPES)
def test_stage_image_untars_and_unstages(scratch: Path, image_type: str) -> None:
    src = scratch / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/os-release").write_text("ID=test\n")
    image = tar_of_dir(scratch / f"image.{image_type}", src, image_type)
    dest = scratch / "job" / "img"
    staged = stage_image(image, image_type, dest)
    try:
        assert staged.method == "untar" and staged.path == dest and staged.image_path == image
        assert (dest / "etc/os-release").read_text() == "ID=test\n"
    finally:
        staged.unstage()
    staged.unstage()  # idempotent
    assert not dest.exists()
    assert leftovers(dest.parent, "img") == []


def test_file_object_source(scratch: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        add_file(tf, "a/b.txt", b"hello")
    raw.seek(0)
    dest = scratch / "dest"
    safe_extract_tar(raw, "tar.gz", dest)
    assert (dest / "a/b.txt").read_bytes() == b"hello"


# -- hostile archives ---------------------------------------------------------


def assert_nothing_staged(dest: Path) -> None:
    assert not dest.exists()
    assert leftovers(dest.parent, dest.name) == []


def test_absolute_member_is_stripped_into_dest(scratch: Path) -> None:
    outside = scratch / "abs-target"
    image = write_tar(scratch / "t.tar", lambda tf: add_file(tf, str(outside), b"data"))
    dest = scratch / "dest"
    safe_extract_tar(image, "tar", dest)
    assert not outside.exists()
    assert (dest / str(outside).lstrip("/")).read_bytes() == b"data"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../escape"])
def test_dotdot_member_is_refused(scratch: Path, name: str) -> None:
    image = write_tar(scratch / "t.tar", lambda tf: add_file(tf, name, b"data"))
    dest = scratch / "sub" / "dest"
    dest.parent.mkdir()
    with pytest.raises(StageError, match=r"refusing member '[./a]*\.\./escape'"):
        safe_extract_tar(image, "tar", dest)
    assert not (scratch / "escape").exists()
    assert not (scratch / "sub/escape").exists()
    assert_nothing_staged(dest)


def test_write_through_symlink_is_refused(scratch: Path) -> None:
    outside = scratch / "outside"
    outside.mkdir()

    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "ok", b"fine")
        add_entry(tf, "evil", tarfile.SYMTYPE, linkname=str(outside))
        add_file(tf, "evil/file", b"pwned")

    image = write_tar(scratch / "t.tar", build)
    dest = scratch / "dest"
    with pytest.raises(StageError, match="refusing member 'evil/file'"):
        safe_extract_tar(image, "tar", dest)
    assert os.listdir(outside) == []
    assert_nothing_staged(dest)


@pytest.mark.parametrize(
    "kind", [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE]
)
def test_no_member_of_any_kind_goes_through_a_symlink(scratch: Path, kind: bytes) -> None:
    """The O_NOFOLLOW walk, not a realpath() check, is what keeps members inside."""
    outside = scratch / "outside"
    outside.mkdir()

    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "target", b"t")
        add_entry(tf, "evil", tarfile.SYMTYPE, linkname=str(outside))
        if kind == tarfile.REGTYPE:
            add_file(tf, "evil/file", b"pwned")
        else:
            add_entry(tf, "evil/file", kind, linkname="target")

    image = write_tar(scratch / "t.tar", build)
    dest = scratch / "dest"
    with pytest.raises(StageError, match="'evil/file': path goes through symlink 'evil'"):
        safe_extract_tar(image, "tar", dest)
    assert os.listdir(outside) == []
    assert_nothing_staged(dest)


def test_member_over_a_symlink_replaces_it(scratch: Path) -> None:
    victim = scratch / "victim"
    victim.write_bytes(b"original")

    def build(tf: tarfile.TarFile) -> None:
        add_entry(tf, "link", tarfile.SYMTYPE, linkname=str(victim))
        add_file(tf, "link", b"overwritten?")
        add_entry(tf, "dirlink", tarfile.SYMTYPE, linkname=str(scratch))
        add_entry(tf, "dirlink", tarfile.DIRTYPE)

    image = write_tar(scratch / "t.tar", build)
    dest = scratch / "dest"
    safe_extract_tar(image, "tar", dest)
    assert victim.read_bytes() == b"original"
    assert not (dest / "link").is_symlink()
    assert (dest / "link").read_bytes() == b"overwritten?"
    assert (dest / "dirlink").is_dir() and not (dest / "dirlink").is_symlink()


@pytest.mark.parametrize(
    ("prelude", "linkname"),
    [
        ([], "/etc/passwd"),
        ([], "../../../../../../etc/passwd"),
        ([("etc", "/etc")], "etc/passwd"),
    ],
)
def test_hardlink_outside_is_refused(
    scratch: Path, prelude: list[tuple[str, str]], linkname: str
) -> None:
    passwd_links = os.stat("/etc/passwd").st_nlink

    def build(tf: tarfile.TarFile) -> None:
        for name, target in prelude:
            add_entry(tf, name, tarfile.SYMTYPE, linkname=target)
        add_entry(tf, "pw", tarfile.LNKTYPE, linkname=linkname)

    image = write_tar(scratch / "t.tar", build)
    dest = scratch / "dest"
    with pytest.raises(StageError, match="refusing member 'pw'"):
        safe_extract_tar(image, "tar", dest)
    assert os.stat("/etc/passwd").st_nlink == passwd_links
    assert_nothing_staged(dest)


def test_hardlink_inside_is_made(scratch: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "/etc/passwd", b"root:x:0:0\n")  # absolute, like `tar -P`
        add_entry(tf, "pw", tarfile.LNKTYPE, linkname="/etc/passwd")

    dest = scratch / "dest"
    safe_extract_tar(write_tar(scratch / "t.tar", build), "tar", dest)
    assert (dest / "pw").stat().st_ino == (dest / "etc/passwd").stat().st_ino
    assert (dest / "pw").read_bytes() == b"root:x:0:0\n"


def test_special_files_are_skipped_and_counted(scratch: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_entry(tf, "dev", tarfile.DIRTYPE)
        add_entry(tf, "dev/null", tarfile.CHRTYPE, mode=0o666)
        add_entry(tf, "dev/sda", tarfile.BLKTYPE, mode=0o660)
        add_entry(tf, "run/fifo", tarfile.FIFOTYPE, mode=0o644)
        add_file(tf, "keep", b"k")

    dest = scratch / "dest"
    report = safe_extract_tar(write_tar(scratch / "t.tar", build), "tar", dest)
    assert report == ExtractReport(
        members=5, extracted=2, skipped=3, modes_cleared=0, bytes_written=1
    )
    assert report.neutralised == 3
    assert os.listdir(dest / "dev") == []
    assert not (dest / "run").exists()
    assert (dest / "keep").read_bytes() == b"k"


def test_dangerous_mode_bits_are_cleared(scratch: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "suid", b"s", mode=0o4755)
        add_file(tf, "sgid", b"s", mode=0o2755)
        add_file(tf, "world-writable", b"w", mode=0o666)
        add_entry(tf, "tmp", tarfile.DIRTYPE, mode=0o1777)
        add_file(tf, "plain", b"p", mode=0o640)

    dest = scratch / "dest"
    report = safe_extract_tar(write_tar(scratch / "t.tar", build), "tar", dest)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in dest.iterdir()}
    assert modes == {
        "suid": 0o755,
        "sgid": 0o755,
        "world-writable": 0o644,
        "tmp": 0o755,
        "plain": 0o640,
    }
    assert report.modes_cleared == 4


def test_archive_ownership_is_not_restored(scratch: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("owned")
        info.uid, info.gid, info.uname, info.gname = 4242, 4343, "someone", "somegroup"
        tf.addfile(info, io.BytesIO(b""))

    dest = scratch / "dest"
    safe_extract_tar(write_tar(scratch / "t.tar", build), "tar", dest)
    st_ = (dest / "owned").stat()
    assert (st_.st_uid, st_.st_gid) == (os.geteuid(), os.getegid())


def test_owner_argument_gets_every_entry(scratch: Path) -> None:
    need(is_root(), "root (to give files to another user)")

    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "d/file", b"f")
        add_entry(tf, "d/link", tarfile.SYMTYPE, linkname="/etc/passwd")
        add_entry(tf, "e", tarfile.DIRTYPE)

    dest = scratch / "dest"
    safe_extract_tar(write_tar(scratch / "t.tar", build), "tar", dest, owner=(65534, 65533))
    for path in [dest, dest / "d", dest / "d/file", dest / "d/link", dest / "e"]:
        st_ = path.lstat()
        assert (st_.st_uid, st_.st_gid) == (65534, 65533), path
    assert os.stat("/etc/passwd").st_uid == 0


def test_nonempty_directory_is_not_replaced(scratch: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "d/inner", b"i")
        add_entry(tf, "d", tarfile.SYMTYPE, linkname="/etc")

    dest = scratch / "dest"
    with pytest.raises(StageError, match=r"refusing member 'd': .*non-empty directory"):
        safe_extract_tar(write_tar(scratch / "t.tar", build), "tar", dest)
    assert_nothing_staged(dest)


# -- broken archives -------------------------------------------------------------


def _two_files(tf: tarfile.TarFile) -> None:
    add_file(tf, "first", os.urandom(10_000))
    add_file(tf, "second", os.urandom(10_000))


@pytest.mark.parametrize("image_type", TAR_TYPES)
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_truncated_archive_is_refused(scratch: Path, image_type: str, keep: float) -> None:
    image = write_tar(scratch / "t", _two_files, image_type)
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * keep)])
    dest = scratch / "dest"
    with pytest.raises(StageError, match="corrupt or truncated"):
        safe_extract_tar(image, image_type, dest)
    assert_nothing_staged(dest)


def test_archive_cut_at_a_member_boundary_is_refused(scratch: Path) -> None:
    """tarfile ends quietly at EOF there; the missing end-of-archive marker gives it away."""
    image = write_tar(scratch / "t.tar", _two_files)
    data = image.read_bytes()
    image.write_bytes(data[: 512 + 10_240])  # first header and its padded data only
    dest = scratch / "dest"
    with pytest.raises(StageError, match="ends after member 'first' without an end-of-archive"):
        safe_extract_tar(image, "tar", dest)
    assert_nothing_staged(dest)


@pytest.mark.parametrize("image_type", TAR_TYPES)
def test_garbage_is_refused(scratch: Path, image_type: str) -> None:
    image = scratch / "garbage"
    image.write_bytes(os.urandom(50_000))
    dest = scratch / "dest"
    with pytest.raises(StageError, match="corrupt or truncated"):
        safe_extract_tar(image, image_type, dest)
    assert_nothing_staged(dest)


def test_unknown_type_is_refused(scratch: Path) -> None:
    with pytest.raises(BadImageFile, match="unknown"):
        safe_extract_tar(scratch / "x", "tar.xz", scratch / "dest")


def test_missing_image_file(scratch: Path) -> None:
    with pytest.raises(StageError, match="cannot open image"):
        safe_extract_tar(scratch / "missing.tar", "tar", scratch / "dest")
    assert_nothing_staged(scratch / "dest")


def test_full_disk_removes_the_partial_tree(scratch: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "small", b"s")
        add_file(tf, "big", os.urandom(4 * 1024 * 1024))

    image = write_tar(scratch / "big.tar", build)
    with tmpfs(scratch / "small", "1m") as small:
        dest = small / "dest"
        with pytest.raises(StageError, match=r"no space left on .*small while unpacking .*'big'"):
            safe_extract_tar(image, "tar", dest)
        assert os.listdir(small) == []


# -- property: whatever the names, nothing lands outside ---------------------------

_COMPONENT = st.sampled_from(["a", "b", "..", ".", "", "evil"])
_NAME = st.lists(_COMPONENT, min_size=1, max_size=5).map("/".join)
_MEMBER = st.tuples(
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
    _NAME,
    st.sampled_from(["a", "../..", "OUTSIDE", "evil/a", "/", ".."]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=st.lists(_MEMBER, min_size=1, max_size=6))
def test_nothing_escapes_whatever_the_names(
    tmp_path_factory: pytest.TempPathFactory, members: list[tuple[bytes, str, str]]
) -> None:
    base = tmp_path_factory.mktemp("prop")
    outside = base / "outside"
    outside.mkdir()
    jail = base / "jail"
    jail.mkdir()

    def build(tf: tarfile.TarFile) -> None:
        for kind, name, link in members:
            target = str(outside) if link == "OUTSIDE" else link
            if kind == tarfile.REGTYPE:
                add_file(tf, name, b"payload")
            else:
                add_entry(tf, name, kind, linkname=target)

    image = write_tar(base / "t.tar", build)
    dest = jail / "dest"
    try:
        safe_extract_tar(image, "tar", dest)
    except StageError:
        assert_nothing_staged(dest)
    assert os.listdir(outside) == []
    assert sorted(os.listdir(jail)) in ([], ["dest"])
    assert sorted(os.listdir(base)) == ["jail", "outside", "t.tar"]
    unstage_path(dest)


_PLAIN_NAME = st.lists(st.sampled_from(["a", "b", "..", ".", ""]), min_size=1, max_size=6).map(
    "/".join
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.one_of(_PLAIN_NAME, _PLAIN_NAME.map(lambda n: "/" + n)),
    mode=st.integers(min_value=0, max_value=0o7777),
    kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE]),
)
def test_member_policy_follows_tar_filter_rules(name: str, mode: int, kind: bytes) -> None:
    """tarfile.tar_filter's rules, checked lexically: strip a leading "/", refuse
    what leaves the destination, clear setuid/setgid/sticky and group/other write."""
    dest = "/nonexistent/p2pcast-dest"
    member = tarfile.TarInfo(name)
    member.type, member.mode = kind, mode
    target = os.path.normpath(os.path.join(dest, name.lstrip("/")))
    if not (target == dest or target.startswith(dest + "/")):
        with pytest.raises(StageError, match="leaves the destination"):
            member_policy(member)
        return
    ours = member_policy(member)
    assert ours is not None
    assert os.path.normpath(os.path.join(dest, ours.name)) == target
    assert ours.mode == mode & 0o755
    assert member.name == name  # the original is left alone
