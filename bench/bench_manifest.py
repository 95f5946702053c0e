"""The manifest of a 1 GiB image at the default 4 MiB chunk size (256 chunks):
build (which validates), encode, decode. A node does each once per broadcast."""

from __future__ import annotations

import random

import pytest

from bench.support import Benchmark
from p2pcast import limits, manifest
from p2pcast.codec import Codec
from p2pcast.hashing import CHUNK_DIGEST_SIZE
from p2pcast.manifest import Manifest

SIZE = 1 * limits.GiB
CHUNK = limits.DEFAULT_CHUNK_SIZE
COUNT = SIZE // CHUNK


def build() -> Manifest:
    """A tarball-like image: every third chunk compressed, the rest raw."""
    rng = random.Random(3)
    codecs = bytes(Codec.ZSTD if i % 3 == 0 else Codec.RAW for i in range(COUNT))
    stored = tuple(
        rng.randint(CHUNK // 4, CHUNK // 2) if c == Codec.ZSTD else CHUNK for c in codecs
    )
    return Manifest(
        name="bench/image:1gib",
        image_type="tar",
        size=SIZE,
        chunk_size=CHUNK,
        sha256=rng.randbytes(32),
        digests=rng.randbytes(CHUNK_DIGEST_SIZE * COUNT),
        stored_sizes=stored,
        codecs=codecs,
    )


@pytest.fixture(scope="module")
def encoded() -> bytes:
    return build().encode()


def test_build_1gib(benchmark: Benchmark) -> None:
    assert benchmark(build).chunk_count == COUNT == 256


def test_encode_1gib(benchmark: Benchmark) -> None:
    m = build()
    data = benchmark(m.encode)
    benchmark.extra_info["bytes"] = len(data)


def test_decode_1gib(benchmark: Benchmark, encoded: bytes) -> None:
    assert benchmark(manifest.decode, encoded) == build()
