"""Real multi-process broadcasts: daemon processes on 127.0.0.x, control socket, CLI."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pcast import control
from p2pcast.demo import DemoCluster, broadcast, make_image
from p2pcast.errors import BadHostlist, ImageNotFound
from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push

MiB = 1 << 20
NODES = 6
IMAGE_SIZE = 128 * MiB


class _Bar:
    def update(self, done: int, total: int) -> None:
        pass


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Manifest]:
    work = tmp_path_factory.mktemp("daemon")
    image = work / "image.tar"
    make_image(image, IMAGE_SIZE)
    origin = work / "origin"

    async def go() -> Manifest:
        async with DirectoryOrigin(str(origin)) as o:
            return (await push(str(image), o, ImageRef("img"))).manifest

    return image, origin, asyncio.run(go())


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[DemoCluster] = []

    def make(origin: Path, loop: str, sendfile: bool, nodes: int = NODES) -> DemoCluster:
        cluster = DemoCluster(tmp_path, nodes, origin, loop, sendfile)
        started.append(cluster)
        cluster.start()
        asyncio.run(cluster.wait_ready())
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "readwrite"])
def test_six_daemons_get_identical_copies(
    published: tuple[Path, Path, Manifest], cluster_factory: Any, loop: str, sendfile: bool
) -> None:
    image, origin, manifest = published
    cluster = cluster_factory(origin, loop, sendfile)
    results = asyncio.run(broadcast(cluster, ImageRef("img"), cluster.names, _Bar()))  # type: ignore[arg-type]
    want = _sha256(image)
    assert manifest.size >= IMAGE_SIZE
    for name, result in results.items():
        assert result["state"] == "complete", name
        assert _sha256(result["path"]) == want, name
    read = sum(int(r["origin_bytes_read"]) for r in results.values())
    assert read <= 1.05 * manifest.stored_total
    # The image really travelled between peers: most bytes came from peers.
    assert (
        sum(int(r["from_peers"]) for r in results.values()) >= (NODES - 2) * manifest.stored_total
    )


@pytest.mark.slow
def test_cache_reuse_status_and_bad_input(
    published: tuple[Path, Path, Manifest], cluster_factory: Any
) -> None:
    _, origin, manifest = published
    cluster = cluster_factory(origin, "uvloop", True, nodes=2)
    ref = ImageRef("img")
    first = asyncio.run(broadcast(cluster, ref, cluster.names, _Bar()))  # type: ignore[arg-type]
    assert all(not r["cached"] for r in first.values())

    # A second request for the same image is served from the cache: no transfer.
    async def again() -> dict[str, Any]:
        return await control.request(
            cluster.control("n1"), "fetch", image="img", peers="n[1-2]", node="n1",
            addresses=cluster.hosts,
        )  # fmt: skip

    second = asyncio.run(again())
    assert second["state"] == "complete"
    status = asyncio.run(control.request(cluster.control("n1"), "status"))
    assert [b["name"] for b in status["broadcasts"]] == ["img"]
    listed = asyncio.run(control.request(cluster.control("n1"), "cache-list"))
    assert [e["complete"] for e in listed["images"]] == [True]

    with pytest.raises(ImageNotFound, match="nosuch"):
        asyncio.run(
            control.request(cluster.control("n1"), "fetch", image="nosuch", peers="n1", node="n1")
        )
    with pytest.raises(BadHostlist, match="not in the hostlist"):
        asyncio.run(
            control.request(cluster.control("n1"), "fetch", image="img", peers="n[5-6]", node="n1")
        )
    # The daemon still serves after bad requests.
    assert asyncio.run(control.request(cluster.control("n1"), "ping"))["node"] == "n1"
    gc = asyncio.run(control.request(cluster.control("n1"), "cache-gc"))
    assert len(gc["removed"]) == 1
    assert manifest.chunk_count > 0
