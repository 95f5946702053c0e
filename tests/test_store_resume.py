"""Resuming a partial image: the re-check of every chunk (ImageFile.scan_held)."""

from __future__ import annotations

import os

from p2pcast.codec import Codec
from p2pcast.store import NodeCache
from tests.test_store import Image, build_image, mixed_bytes, opened, write_all


def _partial(cache: NodeCache, image: Image, indices: list[int]) -> None:
    """A partial copy as a killed daemon leaves it: some chunks written."""
    with opened(cache, image) as f:
        for index in indices:
            f.write_chunk(index, image.stored[index])


def test_scan_holds_good_chunks_and_rejects_corrupt_and_missing(tmp_path: os.PathLike[str]) -> None:
    cache = NodeCache(tmp_path)
    image = build_image(mixed_bytes(8))
    codecs = [c.codec for c in image.manifest.chunks()]
    raw_i = next(i for i, c in enumerate(codecs) if c is Codec.RAW)
    zstd_i = next(i for i, c in enumerate(codecs) if c is Codec.ZSTD)
    written = [0, 1, 2, 3, 5, 8]  # 4, 6, 7 never arrived; 8 is the short tail
    assert raw_i in written and zstd_i in written
    _partial(cache, image, written)
    directory = cache.images / image.image_id.hex()
    # One bit flipped in a raw chunk of the image file, and one in a zstd
    # chunk's stored bytes: neither may count as held.
    chunk = image.manifest.chunk(raw_i)
    with open(directory / "image", "r+b") as f:
        f.seek(chunk.offset + 7)
        byte = f.read(1)
        f.seek(chunk.offset + 7)
        f.write(bytes([byte[0] ^ 1]))
    with opened(cache, image) as f:
        piece = f.chunk_slice(zstd_i)
        os.pwrite(piece.fd, b"\xff", piece.offset + piece.length // 2)
        held = f.scan_held()
        assert held == sorted(set(written) - {raw_i, zstd_i})
        # the missing and corrupt chunks arrive; the sha256 settles it
        for index in set(range(image.manifest.chunk_count)) - set(held):
            f.write_chunk(index, image.stored[index])
        f.verify_image()
    assert (directory / "image").read_bytes() == image.raw


def test_scan_of_a_short_file_holds_only_what_is_there(tmp_path: os.PathLike[str]) -> None:
    cache = NodeCache(tmp_path)
    image = build_image(mixed_bytes(6))
    _partial(cache, image, list(range(image.manifest.chunk_count)))
    directory = cache.images / image.image_id.hex()
    # Cut the image file inside chunk 3 (a disk that lost its tail) and the
    # stored file to nothing: only raw chunks before the cut survive.
    cut = image.manifest.chunk(3).offset + 100
    os.truncate(directory / "image", cut)
    os.truncate(directory / "stored", 0)
    with opened(cache, image) as f:
        assert f.resumed
        held = f.scan_held()
    want = [
        c.index
        for c in image.manifest.chunks()
        if c.codec is Codec.RAW and c.offset + c.raw_size <= cut
    ]
    assert want and held == want


def test_scan_repairs_a_zstd_chunk_whose_image_bytes_were_not_written(
    tmp_path: os.PathLike[str],
) -> None:
    """Killed between a zstd chunk's two writes: its stored bytes verify, its
    raw bytes are missing; the scan writes them from the verified stored ones."""
    cache = NodeCache(tmp_path)
    image = build_image(mixed_bytes(4))
    zstd = [c for c in image.manifest.chunks() if c.codec is Codec.ZSTD]
    _partial(cache, image, list(range(image.manifest.chunk_count)))
    directory = cache.images / image.image_id.hex()
    with open(directory / "image", "r+b") as f:
        f.seek(zstd[0].offset)
        f.write(bytes(zstd[0].raw_size))
    with opened(cache, image) as f:
        assert f.scan_held() == list(range(image.manifest.chunk_count))
        f.verify_image()
    assert (directory / "image").read_bytes() == image.raw


def test_complete_copy_resumes_whole_and_verifies(tmp_path: os.PathLike[str]) -> None:
    cache = NodeCache(tmp_path)
    image = build_image(mixed_bytes(3))
    with opened(cache, image) as f:
        write_all(f, image)  # killed before the sha256 check and the marker
    with opened(cache, image) as f:
        assert f.scan_held() == list(range(image.manifest.chunk_count))
        f.verify_image()
        f.mark_complete()
    assert cache.is_complete(image.image_id)
