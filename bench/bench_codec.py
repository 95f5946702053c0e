"""Per-chunk zstd on 4 MiB: text-like data (compresses, stored zstd) and random
data (does not; the codec tries, gives up and stores it raw).

Rates are in raw (image) bytes per second.
"""

from __future__ import annotations

import random
import string

import pytest

from bench.support import Benchmark, MiB, record_mb_per_s
from p2pcast.codec import Codec, decode_chunk, encode_chunk

CHUNK = 4 * MiB


def text_like(size: int, seed: int = 1) -> bytes:
    """Log- or source-like text: a few thousand words in lines of varying length,
    Zipf-ish word frequencies (zstd -3 makes about a third of it)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(4000)
    ]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    out = bytearray()
    while len(out) < size:
        line = " ".join(rng.choices(words, weights, k=rng.randint(3, 14)))
        out += f"{rng.randint(0, 99999):05d} {line}\n".encode()
    return bytes(out[:size])


DATA = {
    "text": lambda: text_like(CHUNK),
    "random": lambda: random.Random(2).randbytes(CHUNK),
}


@pytest.fixture(scope="module", params=sorted(DATA))
def raw(request: pytest.FixtureRequest) -> bytes:
    return DATA[request.param]()


def test_encode_chunk_4mib(benchmark: Benchmark, raw: bytes) -> None:
    codec, stored = benchmark(encode_chunk, raw)
    benchmark.extra_info["codec"] = codec.name.lower()
    benchmark.extra_info["stored/raw"] = round(len(stored) / len(raw), 3)
    record_mb_per_s(benchmark, len(raw))


def test_decode_chunk_4mib(benchmark: Benchmark, raw: bytes) -> None:
    codec, stored = encode_chunk(raw)
    out = benchmark(decode_chunk, codec, stored, len(raw))
    assert out == raw
    benchmark.extra_info["codec"] = codec.name.lower()
    if codec is Codec.RAW:
        # A raw chunk is returned as it is: a size check, no bytes touched, so
        # a rate would mean nothing.
        benchmark.extra_info["note"] = "raw passthrough, no copy"
    else:
        record_mb_per_s(benchmark, len(raw))


def test_text_compresses_and_random_does_not() -> None:
    assert encode_chunk(DATA["text"]())[0] is Codec.ZSTD
    assert encode_chunk(DATA["random"]())[0] is Codec.RAW
