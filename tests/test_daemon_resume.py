"""A daemon killed (SIGKILL) mid-broadcast resumes from its verified chunks.

Real daemon processes on loopback, with an origin served over HTTP that
answers each chunk slowly, so the victim is killed while it holds part of
the image.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pcast import control
from p2pcast.codec import Codec
from p2pcast.demo import DemoCluster, free_port, make_image
from p2pcast.hashing import file_sha256
from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.store import NodeCache
from tests.test_origin_http import _wait_listening

MiB = 1 << 20
IMAGE_SIZE = 24 * MiB

#: Each chunk GET waits this long (s): at 1 MiB chunks two nodes take ~1.5 s
#: for the image, time enough to kill one of them part-way.
CHUNK_DELAY = 0.12

SLOW_SERVER = """
import functools, http.server, sys, time
class Slow(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if "/chunks/" in self.path:
            time.sleep(float(sys.argv[3]))
        super().do_GET()
    def log_message(self, *args):
        pass
handler = functools.partial(Slow, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


@pytest.fixture
def slow_origin(tmp_path: Path) -> Iterator[tuple[str, Path, Manifest]]:
    image = tmp_path / "image.tar"
    make_image(image, IMAGE_SIZE)
    root = tmp_path / "origin"

    async def publish() -> Manifest:
        async with DirectoryOrigin(str(root)) as origin:
            return (await push(str(image), origin, ImageRef("img"), chunk_size=MiB)).manifest

    manifest = asyncio.run(publish())
    port = free_port("127.0.0.1")
    server = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, str(port), str(root), str(CHUNK_DELAY)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_listening(port)
        yield f"http://127.0.0.1:{port}", image, manifest
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path, slow_origin: tuple[str, Path, Manifest]) -> Iterator[DemoCluster]:
    demo = DemoCluster(tmp_path / "cluster", 2, slow_origin[0], "uvloop", True)
    try:
        demo.start()
        asyncio.run(demo.wait_ready())
        yield demo
    finally:
        demo.stop()


async def _fetch(cluster: DemoCluster, name: str) -> dict[str, Any]:
    return await control.request(
        cluster.control(name), "fetch", image="img", peers="n[1-2]", node=name,
        addresses=cluster.hosts,
    )  # fmt: skip


@pytest.mark.slow
def test_a_daemon_killed_mid_broadcast_resumes_from_its_verified_chunks(
    slow_origin: tuple[str, Path, Manifest], cluster: DemoCluster
) -> None:
    _, image, manifest = slow_origin
    victim = "n2"
    cache = NodeCache(cluster.work / "nodes" / victim / "cache")

    async def first_run() -> dict[str, Any]:
        tasks = {name: asyncio.create_task(_fetch(cluster, name)) for name in cluster.names}
        while True:
            status = await control.request(cluster.control(victim), "status")
            done = [b["chunks_done"] for b in status["broadcasts"]]
            if done and done[0] >= manifest.chunk_count // 3:
                break
            await asyncio.sleep(0.01)
        cluster.procs[victim].kill()  # SIGKILL: no chance to tidy up
        cluster.procs[victim].wait()
        assert done[0] < manifest.chunk_count, "the victim finished before it was killed"
        tasks[victim].cancel()
        await asyncio.gather(tasks[victim], return_exceptions=True)
        return await tasks["n1"]

    survivor = asyncio.run(first_run())
    assert survivor["state"] == "complete"

    # What the victim left: check it as the restarted daemon will, then
    # corrupt one chunk it holds, which must be fetched again, not trusted.
    partial = cache.open(manifest.encode())
    try:
        assert partial.resumed
        held = partial.scan_held()
        assert 0 < len(held) < manifest.chunk_count
        corrupt = next(i for i in held if manifest.chunk(i).codec is Codec.RAW)
        spot = manifest.chunk(corrupt).offset + 1000
        (byte,) = os.pread(partial.image_fd, 1, spot)
        os.pwrite(partial.image_fd, bytes([byte ^ 0xFF]), spot)
    finally:
        partial.close()

    cluster.start_node(victim)
    asyncio.run(cluster.wait_ready())
    result = asyncio.run(_fetch(cluster, victim))

    assert result["state"] == "complete", result
    assert file_sha256(result["path"]) == file_sha256(image)
    assert result["resumed_chunks"] == len(held) - 1
    resumed_bytes = sum(manifest.chunk(i).stored_size for i in held if i != corrupt)
    assert result["resumed_bytes"] == resumed_bytes
    fetched = int(result["from_origin"]) + int(result["from_peers"])
    slack = max(manifest.stored_sizes)
    assert fetched <= manifest.stored_total - resumed_bytes + slack
    assert fetched >= manifest.stored_total - resumed_bytes  # the corrupt one came again
