"""Unpacking an image while it arrives: the prefix arithmetic, the blocking
reader over the growing file, and stage_image(growing=...) end to end."""

from __future__ import annotations

import os
import random
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pcast.errors import StageError
from p2pcast.prefix import ImagePrefix, held_chunks, prefix_bytes, readable_span
from p2pcast.stage import StagedImage, stage_image
from p2pcast.stage.stream import GrowingImageReader, open_growing
from tests.test_stage_support import add_file, leftovers, mount_guard, tmpfs, write_tar

#: Bound on every wait of these tests: they finish in milliseconds; this only
#: turns a hang (the bug these tests look for) into a failure.
HANG = 20.0

#: How long a blocked reader is given to (wrongly) return before the test
#: calls it blocked. Passing never depends on it: a correct reader blocks for
#: as long as the test waits.
BLOCKED = 0.2

FIRST = b'PRETTY_NAME="streamed"\n'
PAYLOAD = random.Random(7).randbytes(2 * 1024 * 1024)


# ---- pure arithmetic --------------------------------------------------------


def test_held_chunks_advances_over_the_contiguous_run() -> None:
    have = [1, 1, 0, 1, 1]
    assert held_chunks(have, 0) == 2
    assert held_chunks(have, 2) == 2
    assert held_chunks([1, 1, 1], 1) == 3
    assert held_chunks([], 0) == 0


def test_prefix_bytes_respects_the_short_last_chunk() -> None:
    assert prefix_bytes(0, 64, 150) == 0
    assert prefix_bytes(2, 64, 150) == 128
    assert prefix_bytes(3, 64, 150) == 150  # the last chunk has 22 bytes
    assert prefix_bytes(0, 64, 0) == 0  # an empty image
    with pytest.raises(ValueError):
        prefix_bytes(-1, 64, 150)


def test_readable_span() -> None:
    assert readable_span(0, 100, 40, 150) == 40  # short: what the prefix holds
    assert readable_span(40, 100, 40, 150) == 0  # wait
    assert readable_span(120, 100, 150, 150) == 30  # the end
    assert readable_span(150, 100, 150, 150) == 0  # EOF (offset >= size)
    assert readable_span(0, 100, 500, 150) == 100  # available never exceeds size
    with pytest.raises(ValueError):
        readable_span(-1, 1, 0, 1)


# ---- the reader ---------------------------------------------------------------


def _image(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "image"
    path.write_bytes(data)
    return path


class _InThread:
    """Run ``func`` in a thread; keep its result or exception."""

    def __init__(self, func: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = func()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def blocked(self) -> bool:
        self.thread.join(BLOCKED)
        return self.thread.is_alive()

    def join(self) -> object:
        self.thread.join(HANG)
        assert not self.thread.is_alive(), "still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def test_reader_blocks_until_the_prefix_holds_the_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    prefix = ImagePrefix("img", len(data))
    with GrowingImageReader(_image(tmp_path, data), prefix) as reader:
        read = _InThread(lambda: reader.read(100))
        assert read.blocked()  # nothing trustworthy yet
        prefix.advance(60)
        assert read.join() == data[:60]  # a short read: what there is
        prefix.advance(len(data))
        assert reader.read(2000) == data[60:]
        assert reader.read(10) == b""  # EOF at the manifest's size


def test_reader_never_reads_past_the_size(tmp_path: Path) -> None:
    # The cache file may be longer (preallocation): the size is the manifest's.
    prefix = ImagePrefix("img", 5)
    prefix.verified()
    with open_growing(_image(tmp_path, b"abcdefgh"), prefix) as reader:
        assert reader.read() == b"abcde"
        assert reader.read(1) == b""


def test_failure_wakes_a_blocked_reader(tmp_path: Path) -> None:
    prefix = ImagePrefix("img", 100)
    prefix.advance(10)
    with GrowingImageReader(_image(tmp_path, bytes(100)), prefix) as reader:
        assert reader.read(50) == bytes(10)  # held before the failure: still served
        read = _InThread(lambda: reader.read(50))
        assert read.blocked()
        prefix.fail("peers and origin gone")
        with pytest.raises(StageError, match="did not arrive: peers and origin gone"):
            read.join()
        with pytest.raises(StageError):
            reader.read(1)  # and every read after


def test_a_verified_image_cannot_fail_any_more(tmp_path: Path) -> None:
    prefix = ImagePrefix("img", 3)
    prefix.verified()
    prefix.fail("the broadcast was stopped")  # a seeding broadcast stops later
    prefix.wait_verified(HANG)
    with open_growing(_image(tmp_path, b"abc"), prefix) as reader:
        assert reader.read() == b"abc"


def test_reader_timeout_and_missing_file(tmp_path: Path) -> None:
    prefix = ImagePrefix("img", 10)
    with (
        GrowingImageReader(_image(tmp_path, bytes(10)), prefix, timeout=0.01) as reader,
        pytest.raises(StageError, match="no new bytes"),
    ):
        reader.read(1)
    with pytest.raises(StageError, match="cannot open image"):
        GrowingImageReader(tmp_path / "absent", prefix)


def test_early_reads_are_counted(tmp_path: Path) -> None:
    prefix = ImagePrefix("img", 10)
    prefix.advance(4)
    with GrowingImageReader(_image(tmp_path, bytes(10)), prefix) as reader:
        assert len(reader.read(10)) == 4
        prefix.advance(10)
        assert len(reader.read(10)) == 6
    assert prefix.read_early == 4  # bytes read while the image was incomplete


# ---- stage_image while the image arrives -------------------------------------------


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    with mount_guard(tmp_path):
        yield tmp_path


def _tar(path: Path, image_type: str) -> Path:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "etc/os-release", FIRST)
        add_file(tf, "payload", PAYLOAD)
        add_file(tf, "last", b"the end\n")

    return write_tar(path, build, image_type)


def _wait_for(what: Callable[[], bool], staging: _InThread) -> None:
    """Until ``what`` holds; fails at once if the staging thread ended instead."""
    deadline = threading.Event()
    for _ in range(int(HANG / 0.01)):
        if what():
            return
        if not staging.thread.is_alive():
            staging.join()  # raises its error
            pytest.fail("staging ended early")
        deadline.wait(0.01)
    pytest.fail("timed out")


def _in_scratch(parent: Path, name: str, member: str) -> bool:
    return any(p.is_file() for p in parent.glob(f".{name}.staging-*/rootfs/{member}"))


@pytest.mark.parametrize("image_type", ["tar", "tar.gz", "tar.zst"])
def test_unpacks_while_arriving_and_publishes_only_when_verified(
    scratch: Path, image_type: str
) -> None:
    image = _tar(scratch / "image", image_type)
    size = image.stat().st_size
    prefix = ImagePrefix("img", size)
    dest = scratch / "staged" / "img"
    staging = _InThread(lambda: stage_image(image, image_type, dest, growing=prefix))

    prefix.advance(size // 2)  # the first member and part of the payload
    _wait_for(lambda: _in_scratch(dest.parent, "img", "etc/os-release"), staging)
    assert not _in_scratch(dest.parent, "img", "last")  # beyond the prefix
    assert not dest.exists()

    prefix.advance(size)  # every chunk held, the sha256 not yet checked
    _wait_for(lambda: _in_scratch(dest.parent, "img", "last"), staging)
    assert staging.blocked()
    assert not dest.exists()  # nothing visible before the whole image verified

    prefix.verified()
    staged = staging.join()
    assert isinstance(staged, StagedImage) and staged.method == "untar"
    assert (dest / "etc" / "os-release").read_bytes() == FIRST
    assert (dest / "payload").read_bytes() == PAYLOAD
    assert leftovers(dest.parent, "img") == ["img"]  # no scratch left
    assert prefix.read_early > 0


@pytest.mark.parametrize("image_type", ["tar", "tar.zst"])
@pytest.mark.parametrize("when", ["mid-way", "before-verified"])
def test_a_failed_image_leaves_nothing(scratch: Path, image_type: str, when: str) -> None:
    image = _tar(scratch / "image", image_type)
    size = image.stat().st_size
    prefix = ImagePrefix("img", size)
    dest = scratch / "staged" / "img"
    staging = _InThread(lambda: stage_image(image, image_type, dest, growing=prefix))
    prefix.advance(size // 2 if when == "mid-way" else size)
    _wait_for(lambda: _in_scratch(dest.parent, "img", "etc/os-release"), staging)
    prefix.fail("image does not match its sha256 after assembly")
    with pytest.raises(StageError, match="did not arrive: image does not match"):
        staging.join()
    assert leftovers(dest.parent, "img") == []


def test_a_corrupt_tar_arriving_leaves_nothing(scratch: Path) -> None:
    good = _tar(scratch / "good", "tar").read_bytes()
    image = scratch / "image"
    image.write_bytes(good[:1536] + b"\xff" * (len(good) - 1536))  # garbage after member 1
    prefix = ImagePrefix("img", len(good))
    prefix.advance(len(good))
    dest = scratch / "staged" / "img"
    with pytest.raises(StageError, match="corrupt or truncated"):
        stage_image(image, "tar", dest, growing=prefix)
    assert leftovers(dest.parent, "img") == []


def test_a_full_tmpfs_while_arriving_leaves_nothing(scratch: Path) -> None:
    image = _tar(scratch / "image", "tar.gz")  # the 2 MiB payload cannot fit
    size = image.stat().st_size
    prefix = ImagePrefix("img", size)
    with tmpfs(scratch / "small", "1m") as small:
        dest = small / "img"
        staging = _InThread(lambda: stage_image(image, "tar.gz", dest, growing=prefix))
        prefix.advance(size)
        # Fails as soon as the tree overflows: no need to wait for the sha256.
        with pytest.raises(StageError, match=r"no space left on .*small while unpacking"):
            staging.join()
        assert os.listdir(small) == []
