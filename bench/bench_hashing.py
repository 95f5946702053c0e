"""Chunk and image digests on one 4 MiB chunk: xxh3-128 must be nearly free
next to the link (10 Gbit/s is 1250 MB/s), sha256 bounds the final image check."""

from __future__ import annotations

import random

import pytest

from bench.support import Benchmark, MiB, record_mb_per_s
from p2pcast.hashing import chunk_digest, image_hasher

CHUNK = 4 * MiB


@pytest.fixture(scope="module")
def chunk() -> bytes:
    return random.Random(1).randbytes(CHUNK)


def sha256_digest(data: bytes) -> bytes:
    hasher = image_hasher()
    hasher.update(data)
    return hasher.digest()


def test_xxh3_128_4mib(benchmark: Benchmark, chunk: bytes) -> None:
    assert len(benchmark(chunk_digest, chunk)) == 16
    record_mb_per_s(benchmark, CHUNK)


def test_sha256_4mib(benchmark: Benchmark, chunk: bytes) -> None:
    assert len(benchmark(sha256_digest, chunk)) == 32
    record_mb_per_s(benchmark, CHUNK)
