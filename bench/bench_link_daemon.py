"""One daemon-to-daemon link against the raw Python pair, in the same run.

Two processes per measurement, as on a cluster (one core each here):

* **raw pair**: a sender process ``os.sendfile``s the whole file on a
  non-blocking socket; this process receives with ``sock_recv_into`` a 4 MiB
  buffer, xxh3-128 of each 4 MiB and ``pwrite`` (bench/rawpair.py's loops).
* **daemon link**: a real ``p2pcast daemon`` process seeds the image from its
  cache; this process runs a p2pcast node (``PeerService`` + ``Broadcast``)
  that fetches every chunk over its one link to it (origin_window=0), with
  requests, the protocol, xxh3 checks, pwrite into the cache and the scheduler
  all in the figure.

The whole-image sha256 check either runs beside the transfer (the daemon's
default: on a node with spare cores it then costs nothing at the end) or after
it. On this 2-core VM the overlapped sha256 (~1.7 GB/s of one core) competes
with the two processes for the CPUs, so the link alone is measured with it
deferred, and the overlapped variant is reported too.

Rounds alternate raw / daemon so both see the same machine load; the ratio is
the median daemon rate over the median raw rate (issue #2's target: >= 0.70),
and the best-of ratio compares the best rounds (the raw pair across two
processes varies from ~250 to ~1,500 MB/s on this 2-core VM; the daemon link
much less).
Both times run from the first byte requested to the last byte written; the
daemon's whole-image sha256 check is reported separately.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.rawpair import _receive, run_uvloop, scratch_dir
from bench.support import MB, Benchmark
from p2pcast import control
from p2pcast.auth import SecretAuth, load_secret
from p2pcast.demo import DemoCluster
from p2pcast.names import ImageRef
from p2pcast.node import Broadcast, BroadcastOptions, Peer, PeerService
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.store import NodeCache
from p2pcast.swarm import SwarmConfig

ROUNDS = 7
ROOT = Path(__file__).resolve().parent.parent

_SENDER = """
import asyncio, os, socket, sys, uvloop
from bench.rawpair import _send
async def main(path, size, port):
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = os.open(path, os.O_RDONLY)
    await _send(loop, sock, fd, size)
    sock.close()
uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def _raw_two_process(path: str, size: int) -> float:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    dest = os.path.join(scratch_dir(), f"p2pcast-bench-{os.getpid()}.recv")
    out_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(out_fd, 0, size)
    sender = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
        [sys.executable, "-c", _SENDER, path, str(size), str(listener.getsockname()[1])],
        cwd=ROOT,
    )
    try:
        sock, _ = await loop.sock_accept(listener)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        await _receive(loop, sock, out_fd, size)
        seconds = time.perf_counter() - start
        sock.close()
        return seconds
    finally:
        sender.wait(timeout=60)
        listener.close()
        os.close(out_fd)
        os.unlink(dest)


async def _daemon_link(
    work: Path, seeder: DemoCluster, zero_copy: bool, hash_while_receiving: bool = True
) -> tuple[float, float]:
    """(seconds to the last chunk, seconds to the verified image) over one link."""
    origin = DirectoryOrigin(str(work / "origin"))
    manifest = await origin.get_manifest(ImageRef("link"))
    cache = work / "fetcher"
    shutil.rmtree(cache, ignore_errors=True)
    auth = SecretAuth(load_secret(seeder.secret_file))
    fetcher = PeerService("b", "127.0.0.1", 0, NodeCache(cache), auth=auth, zero_copy=zero_copy)
    fetcher.start()
    peers = [Peer("n1", seeder.hosts["n1"], seeder.port), Peer("b", "127.0.0.1", fetcher.port)]
    options = BroadcastOptions(
        swarm=SwarmConfig(origin_window=0), hash_while_receiving=hash_while_receiving
    )
    fetch = Broadcast(fetcher, manifest, peers, 1, None, options=options)
    started = time.time()
    await fetch.run()
    done = time.time()
    assert fetch.swarm.bytes_from_peers == fetch.manifest.stored_total
    assert fetch.transfer_done_at is not None
    transfer = fetch.transfer_done_at - started
    await fetch.stop()
    await fetcher.close()
    await origin.close()
    return transfer, done - started


@pytest.mark.parametrize(
    ("zero_copy", "hash_while_receiving"),
    [(True, False), (True, True), (False, False)],
    ids=["sendfile", "sendfile+sha256-overlapped", "readwrite"],
)
def test_daemon_link_vs_raw_pair(
    benchmark: Benchmark, link_source: tuple[str, int], zero_copy: bool, hash_while_receiving: bool
) -> None:
    path, size = link_source
    work = Path(tempfile.mkdtemp(prefix="p2pcast-bench-link-", dir=scratch_dir()))
    seeder: DemoCluster | None = None
    try:
        # The same bytes as the raw pair's, made a SquashFS by its magic.
        image = work / "image.sqfs"
        with open(path, "rb") as src, open(image, "wb") as out:
            out.write(b"hsqs" + src.read(size)[4:])

        async def publish() -> None:
            async with DirectoryOrigin(str(work / "origin")) as origin:
                await push(str(image), origin, ImageRef("link"))

        run_uvloop(publish())
        # The seeding daemon: a real process, its cache filled from the origin.
        seeder = DemoCluster(work, 1, work / "origin", "uvloop", zero_copy)
        seeder.start()
        run_uvloop(seeder.wait_ready())
        run_uvloop(control.request(seeder.control("n1"), "fetch", image="link", node="n1"))

        raw: list[float] = []
        link: list[float] = []
        whole: list[float] = []

        def one_round() -> None:
            raw.append(run_uvloop(_raw_two_process(path, size)))
            transfer, total = run_uvloop(
                _daemon_link(work, seeder, zero_copy, hash_while_receiving)
            )
            link.append(transfer)
            whole.append(total)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        raw_rate = statistics.median(size / MB / s for s in raw[-ROUNDS:])
        link_rate = statistics.median(size / MB / s for s in link[-ROUNDS:])
        whole_rate = statistics.median(size / MB / s for s in whole[-ROUNDS:])
        best_raw = max(size / MB / s for s in raw[-ROUNDS:])
        best_link = max(size / MB / s for s in link[-ROUNDS:])
        benchmark.extra_info.update(
            {
                "best-of ratio": round(best_link / best_raw, 3),
                "raw pair MB/s": round(raw_rate, 1),
                "daemon link MB/s": round(link_rate, 1),
                "daemon link incl. sha256 MB/s": round(whole_rate, 1),
                "ratio": round(link_rate / raw_rate, 3),
                "raw rounds MB/s": [round(size / MB / s) for s in raw[-ROUNDS:]],
                "link rounds MB/s": [round(size / MB / s) for s in link[-ROUNDS:]],
                "bytes": size,
            }
        )
        assert link_rate > 0 and raw_rate > 0
    finally:
        if seeder is not None:
            seeder.stop()
        shutil.rmtree(work, ignore_errors=True)
