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
from p2pcast.errors import BadHostlist, ChunkCorrupt, ImageNotFound, ManifestCorrupt
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


def _publish(origin: Path, image: Path, name: str, size: int) -> Manifest:
    make_image(image, size, seed=hash(name) % 1000)

    async def go() -> Manifest:
        async with DirectoryOrigin(str(origin)) as o:
            return (await push(str(image), o, ImageRef(name), chunk_size=MiB)).manifest

    return asyncio.run(go())


@pytest.mark.slow
def test_two_broadcasts_at_once(tmp_path: Path, cluster_factory: Any) -> None:
    origin = tmp_path / "origin2"
    images = {name: tmp_path / f"{name}.tar" for name in ("alpha", "beta")}
    for name, path in images.items():
        _publish(origin, path, name, 16 * MiB)
    cluster = cluster_factory(origin, "uvloop", True, nodes=3)

    async def both() -> list[dict[str, dict[str, Any]]]:
        return await asyncio.gather(
            *(broadcast(cluster, ImageRef(n), cluster.names, _Bar()) for n in images)  # type: ignore[arg-type]
        )

    for name, results in zip(images, asyncio.run(both()), strict=True):
        want = _sha256(images[name])
        assert all(_sha256(r["path"]) == want for r in results.values()), name


@pytest.mark.slow
def test_corrupt_origin_fails_cleanly_and_daemon_keeps_serving(
    tmp_path: Path, cluster_factory: Any
) -> None:
    origin = tmp_path / "origin3"
    good = _publish(origin, tmp_path / "good.tar", "good", 8 * MiB)
    bad = _publish(origin, tmp_path / "bad.tar", "bad", 8 * MiB)
    # A manifest cut short at the origin.
    mangled = _publish(origin, tmp_path / "cut.tar", "cut", 4 * MiB)
    tag = origin / "tags" / "cut" / "latest"
    tag.write_bytes(tag.read_bytes()[:-5])
    assert mangled.chunk_count
    # One chunk of "bad" rots inside the origin (and only in "bad").
    victim = bad.chunk(bad.chunk_count // 2)
    assert victim.digest not in {c.digest for c in good.chunks()}
    path = origin / "chunks" / victim.key[:2] / victim.key
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))

    cluster = cluster_factory(origin, "uvloop", True, nodes=2)
    sock = cluster.control("n1")

    def fetch(name: str) -> dict[str, Any]:
        return asyncio.run(control.request(sock, "fetch", image=name, peers="n1", node="n1"))

    with pytest.raises(ManifestCorrupt):
        fetch("cut")
    with pytest.raises(ChunkCorrupt, match=f"chunk {victim.index}"):
        fetch("bad")
    # Nothing of the failed image stays in the cache; the failure shows in status.
    listed = asyncio.run(control.request(sock, "cache-list"))
    assert [e["name"] for e in listed["images"]] == []
    status = asyncio.run(control.request(sock, "status"))
    assert [(b["name"], b["state"]) for b in status["broadcasts"]] == [("bad", "failed")]
    # And the daemon still does its job.
    result = fetch("good")
    assert result["state"] == "complete"
    assert _sha256(result["path"]) == _sha256(tmp_path / "good.tar")


@pytest.mark.slow
def test_a_daemon_killed_mid_broadcast_does_not_stop_the_others(
    published: tuple[Path, Path, Manifest], cluster_factory: Any
) -> None:
    image, origin, manifest = published
    cluster = cluster_factory(origin, "uvloop", True)
    victim = "n3"
    survivors = [n for n in cluster.names if n != victim]

    async def run() -> dict[str, dict[str, Any]]:
        async def fetch(name: str) -> dict[str, Any]:
            return await control.request(
                cluster.control(name), "fetch", image="img", peers=f"n[1-{NODES}]", node=name,
                addresses=cluster.hosts,
            )  # fmt: skip

        tasks = {name: asyncio.create_task(fetch(name)) for name in cluster.names}
        # Kill the victim once it holds part of the image (and serves it).
        while True:
            status = await control.request(cluster.control(victim), "status")
            done = [b["chunks_done"] for b in status["broadcasts"]]
            if done and done[0] >= manifest.chunk_count // 4:
                break
            await asyncio.sleep(0.01)
        cluster.procs[victim].kill()
        cluster.procs[victim].wait()
        results = {name: await tasks[name] for name in survivors}
        tasks[victim].cancel()
        await asyncio.gather(tasks[victim], return_exceptions=True)
        return results

    results = asyncio.run(run())
    want = _sha256(image)
    for name, result in results.items():
        assert result["state"] == "complete", name
        assert _sha256(result["path"]) == want, name
    read = sum(int(r["origin_bytes_read"]) for r in results.values())
    # The victim's unread share is read again by its backup; nothing else.
    assert read <= 1.25 * manifest.stored_total
