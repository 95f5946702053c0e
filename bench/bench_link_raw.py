"""BASELINE for the daemon link: raw sendfile -> recv_into + xxh3 + pwrite over
loopback, 256 MiB from /dev/shm, both ends on one uvloop loop (bench/rawpair.py).

Both ends run in one thread, so the figure is about what one core does for one
link (the kernel's loopback work may also run on the other core). Run it twice: with
the kernel's socket-buffer autotuning and with the 4 MiB buffers that
p2pcast.transport sets.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import pytest

from bench.rawpair import raw_pair, run_uvloop, scratch_dir
from bench.support import MB, Benchmark, MiB, median_seconds
from p2pcast.hashing import chunk_digest

#: Socket buffers: the kernel's autotuning, and the 4 MiB that p2pcast.transport
#: asks for (which turns autotuning off).
SOCKBUF = {"autotune": None, "sockbuf4m": 4 * MiB}


@pytest.mark.parametrize("sockbuf", sorted(SOCKBUF))
def test_raw_pair_256mib(benchmark: Benchmark, link_source: tuple[str, int], sockbuf: str) -> None:
    path, size = link_source
    transfers: list[float] = []

    def one_run() -> None:
        transfers.append(run_uvloop(raw_pair(path, size, sockbuf=SOCKBUF[sockbuf])))

    benchmark.pedantic(one_run, rounds=3, iterations=1, warmup_rounds=1)
    # "MB/s" is the transfer alone, as raw_pair times it (first byte sent to
    # last byte written), which is what the daemon-link benchmark compares
    # with; the whole call adds a fresh loop, the connection, and creating and
    # removing the 256 MiB destination file.
    rates = [round(size / MB / s, 1) for s in transfers[-3:]]
    benchmark.extra_info["MB/s"] = statistics.median(rates)
    benchmark.extra_info["MB/s per round"] = rates
    seconds = median_seconds(benchmark)
    if seconds:
        benchmark.extra_info["MB/s whole call"] = round(size / MB / seconds, 1)
    benchmark.extra_info["bytes"] = size


def test_raw_pair_delivers_the_file(link_source: tuple[str, int]) -> None:
    """The baseline moves the bytes it claims to (a short copy, checked whole)."""
    path, _ = link_source
    size = 9 * MiB + 12345  # not a multiple of the buffer: the last piece is short
    fd, dest = tempfile.mkstemp(prefix="p2pcast-bench-", suffix=".recv", dir=scratch_dir())
    os.close(fd)
    try:
        run_uvloop(raw_pair(path, size, keep=dest))
        with open(path, "rb") as src, open(dest, "rb") as out:
            sent, received = src.read(size), out.read()
        assert len(received) == size
        assert chunk_digest(received) == chunk_digest(sent)
    finally:
        os.unlink(dest)
