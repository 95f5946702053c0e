"""Chunk codec: zstd only where it pays, and sizes bounded by the manifest."""

from __future__ import annotations

import random
import tracemalloc

import pytest
import zstandard

from p2pcast import limits
from p2pcast.codec import MIN_SAVING, Codec, decode_chunk, encode_chunk
from p2pcast.errors import ChunkCorrupt

MiB = limits.MiB

#: Size the bombs expand to; large enough that allocating it would dwarf the
#: bound checked below, small enough to build quickly.
BOMB_SIZE = 64 * MiB
#: Peak traced allocation allowed while refusing a bomb: a few raw chunks.
BOMB_PEAK_LIMIT = 4 * MiB


def text_chunk(size: int = MiB) -> bytes:
    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    return (line * (size // len(line) + 1))[:size]


def random_chunk(size: int = MiB, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def make_bomb(*, declare_size: bool) -> bytes:
    """A small zstd frame that expands to BOMB_SIZE zero bytes."""
    compressor = zstandard.ZstdCompressor(write_content_size=declare_size)
    piece = bytes(MiB)
    chunker = compressor.compressobj(size=BOMB_SIZE if declare_size else -1)
    parts = [chunker.compress(piece) for _ in range(BOMB_SIZE // MiB)]
    parts.append(chunker.flush())
    return b"".join(parts)


def test_compressible_chunk_is_zstd_and_round_trips() -> None:
    raw = text_chunk()
    codec, stored = encode_chunk(raw)
    assert codec is Codec.ZSTD
    assert len(stored) <= len(raw) * (1 - MIN_SAVING)
    assert bytes(decode_chunk(codec, stored, len(raw))) == raw


def test_random_chunk_stays_raw() -> None:
    raw = random_chunk()
    codec, stored = encode_chunk(raw)
    assert codec is Codec.RAW
    assert stored == raw
    assert bytes(decode_chunk(codec, stored, len(raw))) == raw


def test_encode_accepts_memoryview_and_bytearray() -> None:
    raw = text_chunk(64 * 1024)
    assert encode_chunk(memoryview(raw)) == encode_chunk(bytearray(raw)) == encode_chunk(raw)


def test_raw_chunk_with_wrong_size_is_corrupt() -> None:
    raw = random_chunk(1000)
    with pytest.raises(ChunkCorrupt):
        decode_chunk(Codec.RAW, raw, 999)
    with pytest.raises(ChunkCorrupt):
        decode_chunk(Codec.RAW, raw, 1001)


@pytest.mark.parametrize("raw_size", [MiB - 1, MiB + 1, MiB // 2, 1])
def test_zstd_chunk_with_wrong_raw_size_is_corrupt(raw_size: int) -> None:
    codec, stored = encode_chunk(text_chunk())
    assert codec is Codec.ZSTD
    with pytest.raises(ChunkCorrupt):
        decode_chunk(codec, stored, raw_size)


def test_zstd_chunk_without_declared_size_and_wrong_raw_size_is_corrupt() -> None:
    raw = text_chunk()
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert bytes(decode_chunk(Codec.ZSTD, stored, len(raw))) == raw
    with pytest.raises(ChunkCorrupt):
        decode_chunk(Codec.ZSTD, stored, len(raw) - 1)
    with pytest.raises(ChunkCorrupt):
        decode_chunk(Codec.ZSTD, stored, len(raw) + 1)


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not zstd at all", id="no-magic"),
        pytest.param(b"\x28\xb5\x2f\xfd", id="magic-only"),
        pytest.param(b"\x28\xb5\x2f\xfd" + random_chunk(200, seed=3), id="magic-then-garbage"),
        pytest.param(zstandard.ZstdCompressor().compress(text_chunk())[:-5], id="truncated"),
    ],
)
def test_garbage_zstd_is_corrupt(stored: bytes) -> None:
    with pytest.raises(ChunkCorrupt):
        decode_chunk(Codec.ZSTD, stored, MiB)


@pytest.mark.parametrize("declare_size", [True, False], ids=["declared", "undeclared"])
def test_zstd_bomb_is_corrupt_without_allocating_it(declare_size: bool) -> None:
    bomb = make_bomb(declare_size=declare_size)
    assert len(bomb) < 64 * 1024  # it really is a bomb
    raw_size = MiB
    tracemalloc.start()
    try:
        with pytest.raises(ChunkCorrupt):
            decode_chunk(Codec.ZSTD, bomb, raw_size)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BOMB_PEAK_LIMIT, f"refusing a bomb allocated {peak} bytes"


def test_codec_numbers_never_change() -> None:
    # They are in every manifest and on the wire.
    assert {c.name: c.value for c in Codec} == {"RAW": 0, "ZSTD": 1}
