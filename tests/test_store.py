"""The node cache: verified chunk writes, slices for sendfile, completion, cleanup."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast.codec import Codec, encode_chunk
from p2pcast.errors import ChunkCorrupt, ImageDigestMismatch, StoreError
from p2pcast.hashing import chunk_digest
from p2pcast.manifest import Manifest, image_id_of
from p2pcast.store import ROOM_SLACK, ImageFile, NodeCache, space_needed

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB  # the smallest chunk size a manifest allows


@dataclasses.dataclass(frozen=True)
class Image:
    """An image cut into chunks the way push cuts it, without an origin."""

    raw: bytes
    manifest: Manifest
    manifest_bytes: bytes
    stored: list[bytes]

    @property
    def image_id(self) -> bytes:
        return image_id_of(self.manifest_bytes)


def build_image(raw: bytes, *, name: str = "test/image", chunk_size: int = CHUNK) -> Image:
    stored: list[bytes] = []
    codecs = bytearray()
    for offset in range(0, len(raw), chunk_size):
        codec, data = encode_chunk(raw[offset : offset + chunk_size])
        codecs.append(codec)
        stored.append(data)
    manifest = Manifest(
        name=name,
        image_type="tar",
        size=len(raw),
        chunk_size=chunk_size,
        sha256=hashlib.sha256(raw).digest(),
        digests=b"".join(chunk_digest(s) for s in stored),
        stored_sizes=tuple(len(s) for s in stored),
        codecs=bytes(codecs),
    )
    return Image(raw, manifest, manifest.encode(), stored)


def mixed_bytes(chunks: int, *, seed: int = 1, tail: int = 1000) -> bytes:
    """Alternating random (stays raw) and repetitive (zstd) chunks, plus a short tail."""
    rng = random.Random(seed)
    parts = []
    for i in range(chunks):
        if i % 2:
            parts.append(rng.randbytes(CHUNK))
        else:
            parts.append((f"line {seed} {i} ".encode() * CHUNK)[:CHUNK])
    parts.append(rng.randbytes(tail))
    return b"".join(parts)


@pytest.fixture
def image() -> Image:
    img = build_image(mixed_bytes(6))
    codecs = {c.codec for c in img.manifest.chunks()}
    assert codecs == {Codec.RAW, Codec.ZSTD}, "the fixture must exercise both codecs"
    return img


@pytest.fixture
def cache(tmp_path: Path) -> NodeCache:
    return NodeCache(tmp_path / "cache")


@contextlib.contextmanager
def opened(cache: NodeCache, img: Image) -> Iterator[ImageFile]:
    f = cache.open(img.manifest_bytes)
    try:
        yield f
    finally:
        f.close()


def write_all(f: ImageFile, img: Image) -> None:
    for index, data in enumerate(img.stored):
        f.write_chunk(index, data)


def read_file(path: Path) -> bytes:
    return path.read_bytes()


# ---- chunk writes -----------------------------------------------------------------


def test_open_reserves_space_and_records_the_manifest(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        assert not f.complete
        assert f.image_path.stat().st_size == image.manifest.size
        zstd = [c for c in image.manifest.chunks() if c.codec is Codec.ZSTD]
        assert f.stored_total == sum(c.stored_size for c in zstd)
        assert f.stored_path.stat().st_size == f.stored_total
        assert (f.directory / "manifest").read_bytes() == image.manifest_bytes
        assert f.directory.name == image.image_id.hex()
    assert not cache.is_complete(image.image_id)


def test_chunk_slices_hold_the_stored_bytes(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        write_all(f, image)
        for chunk in image.manifest.chunks():
            piece = f.chunk_slice(chunk.index)
            want_fd = f.image_fd if chunk.codec is Codec.RAW else f.stored_fd
            assert piece.fd == want_fd, f"chunk {chunk.index} ({chunk.codec.name})"
            assert piece.length == chunk.stored_size
            got = os.pread(piece.fd, piece.length, piece.offset)
            assert got == image.stored[chunk.index]
            assert f.read_stored(chunk) == image.stored[chunk.index]
            if chunk.codec is Codec.RAW:
                assert piece.offset == chunk.offset
    # The image file holds the raw image, whatever the codecs.
    assert read_file(f.image_path) == image.raw


def test_chunks_may_arrive_in_any_order(cache: NodeCache, image: Image) -> None:
    order = list(range(image.manifest.chunk_count))
    random.Random(3).shuffle(order)
    with opened(cache, image) as f:
        for index in order:
            f.write_chunk(index, image.stored[index])
        f.verify_image()
    assert read_file(f.image_path) == image.raw


@pytest.mark.parametrize("codec", [Codec.RAW, Codec.ZSTD])
@pytest.mark.parametrize("damage", ["flipped byte", "one byte short", "one byte long"])
def test_bad_chunk_is_refused_and_not_written(
    cache: NodeCache, image: Image, codec: Codec, damage: str
) -> None:
    chunk = next(c for c in image.manifest.chunks() if c.codec is codec)
    good = image.stored[chunk.index]
    if damage == "flipped byte":
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01
        data = bytes(bad)
    elif damage == "one byte short":
        data = good[:-1]
    else:
        data = good + b"\0"
    with opened(cache, image) as f:
        with pytest.raises(ChunkCorrupt, match=f"chunk {chunk.index}"):
            f.write_chunk(chunk.index, data)
        # Nothing of it reached the files: both still hold the zeros of the
        # reservation.
        raw_region = os.pread(f.image_fd, chunk.raw_size, chunk.offset)
        assert raw_region == bytes(chunk.raw_size)
        assert read_file(f.stored_path) == bytes(f.stored_total)
        assert not f.complete
        # The good bytes are still accepted afterwards.
        f.write_chunk(chunk.index, good)
        assert f.read_stored(chunk) == good
    assert not cache.is_complete(image.image_id)


def test_write_chunk_accepts_memoryview(cache: NodeCache, image: Image) -> None:
    # The zero-copy receive path hands a memoryview of its buffer.
    with opened(cache, image) as f:
        for index, data in enumerate(image.stored):
            buffer = bytearray(data) + b"trailing junk beyond the body"
            f.write_chunk(index, memoryview(buffer)[: len(data)])
        f.verify_image()


def test_chunk_index_outside_the_manifest(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f, pytest.raises(IndexError):
        f.write_chunk(image.manifest.chunk_count, image.stored[0])


# ---- whole image --------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    """Rot behind the cache's back, e.g. a bad disk block."""
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0x80]), offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["first byte", "middle", "last byte"])
def test_verify_image_detects_a_flipped_byte(cache: NodeCache, image: Image, where: str) -> None:
    offset = {"first byte": 0, "middle": image.manifest.size // 2}.get(
        where, image.manifest.size - 1
    )
    with opened(cache, image) as f:
        write_all(f, image)
        flip_byte(f.image_path, offset)
        with pytest.raises(ImageDigestMismatch, match=image.manifest.name):
            f.verify_image()
        assert not f.complete


def test_verify_image_after_incremental_hashing(cache: NodeCache, image: Image) -> None:
    # The broadcast hashes the verified prefix as it grows; the final check
    # then only hashes the rest. The result must be the same as one pass.
    with opened(cache, image) as f:
        for index, data in enumerate(image.stored):
            f.write_chunk(index, data)
            f.hash_upto(min((index + 1) * CHUNK, image.manifest.size))
        assert f.hashed == image.manifest.size
        f.verify_image()
    with opened(cache, image) as f:
        write_all(f, image)
        f.hash_upto(2 * CHUNK)
        flip_byte(f.image_path, 3 * CHUNK + 5)  # past the hashed prefix
        with pytest.raises(ImageDigestMismatch):
            f.verify_image()


def test_verify_image_detects_a_truncated_file(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        write_all(f, image)
        os.truncate(f.image_path, image.manifest.size - 100)
        with pytest.raises(ImageDigestMismatch, match="shorter"):
            f.verify_image()


def test_verify_image_detects_a_missing_chunk(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        for index, data in enumerate(image.stored[:-1]):
            f.write_chunk(index, data)
        with pytest.raises(ImageDigestMismatch):
            f.verify_image()


def test_complete_image_reopens_complete_and_read_only(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        write_all(f, image)
        f.verify_image()
        f.mark_complete()
        assert f.complete
    assert cache.is_complete(image.image_id)
    assert not list(f.directory.glob("*.tmp"))
    with opened(cache, image) as again:
        assert again.complete
        assert again.directory == f.directory
        with pytest.raises(OSError):
            os.pwrite(again.image_fd, b"x", 0)
        for chunk in image.manifest.chunks():
            assert again.read_stored(chunk) == image.stored[chunk.index]
        again.verify_image()
    assert read_file(cache.image_path(image.image_id)) == image.raw


def test_partial_image_is_kept_but_not_trusted_on_open(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        assert not f.resumed
        f.write_chunk(0, image.stored[0])
    with opened(cache, image) as again:
        assert not again.complete and again.resumed
        # the bytes are still there; only scan_held decides what counts
        assert os.pread(again.image_fd, 16, 0) == image.raw[:16]
        assert again.scan_held() == [0]
        write_all(again, image)
        again.verify_image()


def test_partial_with_another_manifest_file_is_started_over(cache: NodeCache, image: Image) -> None:
    with opened(cache, image) as f:
        f.write_chunk(0, image.stored[0])
        (f.directory / "manifest").write_bytes(image.manifest_bytes[:-1])  # a torn write
    with opened(cache, image) as again:
        assert not again.resumed
        assert os.pread(again.image_fd, 16, 0) == bytes(16)
        assert (again.directory / "manifest").read_bytes() == image.manifest_bytes


def test_close_is_idempotent(cache: NodeCache, image: Image) -> None:
    f = cache.open(image.manifest_bytes)
    f.close()
    f.close()
    assert f.image_fd == f.stored_fd == -1


def test_image_without_zstd_chunks_has_an_empty_stored_file(cache: NodeCache) -> None:
    img = build_image(random.Random(5).randbytes(3 * CHUNK))
    assert {c.codec for c in img.manifest.chunks()} == {Codec.RAW}
    with opened(cache, img) as f:
        assert f.stored_total == 0
        write_all(f, img)
        f.verify_image()
        f.mark_complete()
    assert cache.is_complete(img.image_id)


# ---- the cache as a whole ----------------------------------------------------------


def test_entries_gc_and_remove_partial(cache: NodeCache) -> None:
    done = build_image(mixed_bytes(3, seed=1), name="a/done")
    partial = build_image(mixed_bytes(3, seed=2), name="b/partial")
    other = build_image(mixed_bytes(2, seed=3), name="c/other")
    for img in (done, other):
        with opened(cache, img) as f:
            write_all(f, img)
            f.mark_complete()
    with opened(cache, partial) as f:
        f.write_chunk(0, partial.stored[0])
    (cache.images / "not-an-image").mkdir()  # a stray directory is ignored

    entries = {e.name: e for e in cache.entries()}
    assert set(entries) == {"a/done", "b/partial", "c/other"}
    assert entries["a/done"].complete and entries["c/other"].complete
    assert not entries["b/partial"].complete
    assert entries["a/done"].image_id == done.image_id.hex()
    assert entries["a/done"].size == len(done.raw)
    assert entries["a/done"].path == cache.image_path(done.image_id)
    assert entries["a/done"].to_dict()["complete"] is True

    # young partials stay (a restart resumes them); stale ones and strays go
    assert cache.remove_stale_partial() == 1
    assert not (cache.images / "not-an-image").exists()
    assert cache.image_path(partial.image_id).parent.exists()
    assert cache.remove_stale_partial(max_age=3600, now=time.time() + 3599) == 0
    assert cache.remove_stale_partial(max_age=3600, now=time.time() + 3601) == 1
    assert not cache.image_path(partial.image_id).parent.exists()
    with opened(cache, partial) as f:
        f.write_chunk(0, partial.stored[0])

    removed = cache.gc(keep={done.image_id.hex()})
    assert sorted(e.name for e in removed) == ["b/partial", "c/other"]
    assert not cache.image_path(other.image_id).parent.exists()
    assert cache.is_complete(done.image_id)
    assert [e.name for e in cache.entries()] == ["a/done"]

    cache.discard(done.image_id)
    assert list(cache.entries()) == []
    cache.discard(done.image_id)  # discarding twice is fine


def test_least_recently_used_orders_complete_images_by_last_use(cache: NodeCache) -> None:
    images = [build_image(mixed_bytes(2, seed=i), name=f"lru/{i}") for i in range(4)]
    for img in images[:3]:
        with opened(cache, img) as f:
            write_all(f, img)
            f.mark_complete()
    with opened(cache, images[3]) as f:  # a partial one is never a candidate
        f.write_chunk(0, images[3].stored[0])
    # Completed in the order 0, 1, 2 an hour ago; then 0 opened again (used now).
    for age, img in zip((3600, 3500, 3400), images[:3], strict=True):
        marker = cache.image_path(img.image_id).parent / "complete"
        os.utime(marker, (time.time() - age, time.time() - age))
    with opened(cache, images[0]) as f:
        assert f.complete
    order = [e.name for e in cache.least_recently_used(keep=set())]
    assert order == ["lru/1", "lru/2", "lru/0"]
    keep = {images[2].image_id.hex()}
    assert [e.name for e in cache.least_recently_used(keep)] == ["lru/1", "lru/0"]


def test_space_and_what_an_image_needs(cache: NodeCache, image: Image) -> None:
    free, total = cache.space()
    assert 0 < free <= total
    stored = sum(c.stored_size for c in image.manifest.chunks() if c.codec is not Codec.RAW)
    assert space_needed(image.manifest) == len(image.raw) + stored + ROOM_SLACK
    assert cache.held_bytes(image.image_id) == 0
    with opened(cache, image):
        # The reservation made at open is what a resumed copy already holds.
        assert cache.held_bytes(image.image_id) >= len(image.raw) + stored


def test_cache_root_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="creating cache"):
        NodeCache(blocker / "cache")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root); unmounted afterwards whatever happens."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def big_manifest(size: int) -> bytes:
    """A valid manifest for a raw image of ``size`` bytes (its data never exists)."""
    count = -(-size // CHUNK)
    return Manifest(
        name="too/big",
        image_type="squashfs",
        size=size,
        chunk_size=CHUNK,
        sha256=bytes(32),
        digests=bytes(16 * count),
        stored_sizes=tuple(min(CHUNK, size - i * CHUNK) for i in range(count)),
        codecs=bytes(count),
    ).encode()


def test_full_disk_fails_at_open_and_leaves_nothing(small_tmpfs: Path) -> None:
    cache = NodeCache(small_tmpfs / "cache")
    before = os.statvfs(small_tmpfs).f_bfree
    with pytest.raises(StoreError, match="space"):
        cache.open(big_manifest(4 * MiB))
    assert list(cache.images.iterdir()) == []
    assert os.statvfs(small_tmpfs).f_bfree == before
    # An image that fits still works on the same disk.
    img = build_image(mixed_bytes(4))
    with opened(cache, img) as f:
        write_all(f, img)
        f.verify_image()
