"""One daemon-to-daemon link against the raw Python pair, in the same run.

A seeding node (image complete in its cache) and a fetching node, both
p2pcast ``PeerService`` + ``Broadcast`` on one uvloop loop in this process,
like the raw pair's two tasks (bench/rawpair.py). The fetcher reads nothing
from the origin (origin_window=0), so all 256 MiB cross the one link: the
protocol, requests, xxh3 checks, pwrite into the cache and the scheduler are
all in the figure. Rounds alternate raw pair / daemon link, so both see the
same machine load; the ratio is the median daemon rate over the median raw
rate. The target of issue #2 is a ratio of at least 0.70.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import pytest

from bench.rawpair import raw_pair, run_uvloop, scratch_dir
from bench.support import MB, Benchmark
from p2pcast.names import ImageRef
from p2pcast.node import Broadcast, BroadcastOptions, Peer, PeerService
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.store import NodeCache
from p2pcast.swarm import SwarmConfig

ROUNDS = 3


async def _daemon_link(work: str, image: str, zero_copy: bool) -> tuple[float, float]:
    """(seconds to the last chunk, seconds to the verified image) over one link."""
    origin = DirectoryOrigin(os.path.join(work, "origin"))
    ref = ImageRef("link")
    await push(image, origin, ref)
    manifest = await origin.get_manifest(ref)
    nodes = os.path.join(work, "nodes")
    shutil.rmtree(nodes, ignore_errors=True)
    seeder = PeerService("a", "127.0.0.1", 0, NodeCache(f"{nodes}/a"), zero_copy=zero_copy)
    fetcher = PeerService("b", "127.0.0.1", 0, NodeCache(f"{nodes}/b"), zero_copy=zero_copy)
    seeder.start()
    fetcher.start()
    seed = Broadcast(seeder, manifest, [Peer("a", "127.0.0.1", seeder.port)], 0, origin)
    await seed.run()
    peers = [Peer("a", "127.0.0.1", seeder.port), Peer("b", "127.0.0.1", fetcher.port)]
    options = BroadcastOptions(swarm=SwarmConfig(origin_window=0))
    fetch = Broadcast(fetcher, manifest, peers, 1, None, options=options)
    started = time.time()
    await fetch.run()
    done = time.time()
    assert fetch.swarm.bytes_from_peers == fetch.manifest.stored_total
    assert fetch.transfer_done_at is not None
    transfer = fetch.transfer_done_at - started
    for broadcast in (fetch, seed):
        await broadcast.stop()
    await fetcher.close()
    await seeder.close()
    await origin.close()
    return transfer, done - started


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "readwrite"])
def test_daemon_link_vs_raw_pair(
    benchmark: Benchmark, link_source: tuple[str, int], zero_copy: bool
) -> None:
    path, size = link_source
    work = tempfile.mkdtemp(prefix="p2pcast-bench-link-", dir=scratch_dir())
    image = os.path.join(work, "image.sqfs")
    try:
        # The same bytes as the raw pair's, made a SquashFS by its magic.
        with open(path, "rb") as src, open(image, "wb") as out:
            out.write(b"hsqs" + src.read(size)[4:])
        raw: list[float] = []
        link: list[float] = []
        whole: list[float] = []

        def one_round() -> None:
            raw.append(run_uvloop(raw_pair(path, size)))
            transfer, total = run_uvloop(_daemon_link(work, image, zero_copy))
            link.append(transfer)
            whole.append(total)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        raw_rate = statistics.median(size / MB / s for s in raw[-ROUNDS:])
        link_rate = statistics.median(size / MB / s for s in link[-ROUNDS:])
        whole_rate = statistics.median(size / MB / s for s in whole[-ROUNDS:])
        benchmark.extra_info.update(
            {
                "raw pair MB/s": round(raw_rate, 1),
                "daemon link MB/s": round(link_rate, 1),
                "daemon link incl. sha256 MB/s": round(whole_rate, 1),
                "ratio": round(link_rate / raw_rate, 3),
                "bytes": size,
            }
        )
        assert link_rate > 0 and raw_rate > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
