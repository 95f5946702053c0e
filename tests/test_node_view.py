"""Real in-process broadcasts over partial overlay views.

The default overlay is a full mesh up to 64 nodes, too many to run here; a
small ``max_links`` with ``full_mesh=0`` gives 8 nodes partial views, so the
daemon's neighbour-only linking runs for real over loopback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from p2pcast import overlay
from p2pcast.errors import P2PCastError
from p2pcast.node import Broadcast, BroadcastOptions
from p2pcast.protocol import (
    BitfieldReceived,
    ChunkBodyEnded,
    Event,
    RequestRejected,
    bit_is_set,
)
from p2pcast.transport import PeerLink, connect
from tests.helpers_node import (
    HOST,
    STEP_TIMEOUT,
    Published,
    publish,
    run_on,
    running,
    sha256_of,
)

MiB = 1024 * 1024
NODES = 8
#: partial views: 3 neighbours of 7 other nodes
VIEW_OPTIONS = BroadcastOptions(max_links=3, full_mesh=0, linger=30.0)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """A ~8 MiB tar in 256 KiB chunks: a few chunks per node, raw and zstd."""
    return publish(
        tmp_path_factory.mktemp("published"), chunk_size=256 * 1024, members=8, member_size=MiB
    )


def test_partial_views_are_partial_and_symmetric() -> None:
    views = [
        overlay.neighbours(r, NODES, degree=VIEW_OPTIONS.max_links, full_mesh=0)
        for r in range(NODES)
    ]
    for rank, view in enumerate(views):
        assert len(view) <= 3 < NODES - 1
        assert {(rank - 1) % NODES, (rank + 1) % NODES} <= set(view)
        assert all(rank in views[other] for other in view)
    # The defaults keep a full mesh at this size, as before the overlay.
    assert overlay.neighbours(0, NODES) == tuple(range(1, NODES))
    with pytest.raises(ValueError, match="degree"):
        overlay.neighbours(0, NODES, degree=1, full_mesh=0)


def test_broadcast_over_partial_views(tmp_path: Path, published: Published) -> None:
    manifest = published.manifest
    stored_total = manifest.stored_total

    async def main() -> None:
        async with running(tmp_path, published, NODES) as cluster:
            started = cluster.start_broadcasts(published, VIEW_OPTIONS)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(*(b.run() for b in started))
                lingered = loop.time()
                await asyncio.gather(*(b.linger() for b in started))
            # Lingering ended because every neighbour had the image, not by
            # running out its 30 s.
            assert loop.time() - lingered < 10.0

            names = [n.name for n in cluster.nodes]
            keys = [p.key for p in cluster.peers]
            for rank, (node, broadcast) in enumerate(zip(cluster.nodes, started, strict=True)):
                view = overlay.neighbours(rank, NODES, degree=3, full_mesh=0)
                assert broadcast.view == view
                assert set(broadcast.swarm.peers) == set(view)
                # Links opened only to neighbours, and to every one of them.
                assert set(node.service.out_links) == {keys[r] for r in view}
                assert set(broadcast.rank_links) == set(view)
                assert broadcast.ever_connected == set(view)
                # Links accepted only from neighbours (the graph is
                # symmetric), and each of them subscribed: announcements
                # went to every neighbour.
                in_names = {link.peer_node for link in node.service.in_links}
                assert in_names == {names[r] for r in view}
                subscribed = node.service.subscribers[manifest.image_id]
                assert {link.peer_node for link in subscribed} == {names[r] for r in view}

                path = node.service.cache.image_path(manifest.image_id)
                assert sha256_of(path) == published.sha256, f"{node.name} differs"
                progress = broadcast.progress()
                assert progress["state"] == "complete"
                assert progress["error"] is None
                assert progress["dead_peers"] == []
                assert progress["chunks_done"] == manifest.chunk_count
            # The chunks fanned out over the overlay: the origin was read
            # about once, and most nodes got most bytes from peers.
            assert stored_total <= cluster.origin_bytes() <= 1.1 * stored_total
            from_peers = sum(b.progress()["from_peers"] for b in started)
            assert from_peers >= 0.9 * (NODES - 1) * stored_total

    run_on("uvloop", main())


class Recorder:
    """A LinkHandler for a bare downstream link: records what comes back."""

    def __init__(self, published: Published) -> None:
        self.manifest = published.manifest
        self.events: list[Event] = []
        self.bodies: dict[int, bytes] = {}
        self.closed: P2PCastError | bool = False
        self.changed = asyncio.Event()

    def link_event(self, link: PeerLink, event: Event, body: memoryview | None) -> None:
        self.events.append(event)
        if isinstance(event, ChunkBodyEnded) and body is not None:
            self.bodies[event.index] = bytes(body)
        self.changed.set()

    def link_closed(self, link: PeerLink, error: P2PCastError | None) -> None:
        self.closed = error or True
        self.changed.set()

    def chunk_length(self, image_id: bytes, index: int) -> int | None:
        return self.manifest.chunk(index).stored_size

    async def wait_for(self, kind: type[Event], index: int) -> Event:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and getattr(event, "index", index) == index:
                        return event
                assert self.closed is False, f"link closed: {self.closed}"
                self.changed.clear()
                await self.changed.wait()


def test_node_outside_the_view_is_served(tmp_path: Path, published: Published) -> None:
    manifest = published.manifest
    image_id = manifest.image_id
    view = overlay.neighbours(0, NODES, degree=3, full_mesh=0)
    stranger = next(r for r in range(1, NODES) if r not in view)

    async def main() -> None:
        async with running(tmp_path, published, NODES) as cluster:
            node = cluster.nodes[0]
            # Cache the image on node 0 alone, then seed it over a partial view.
            alone = Broadcast(
                node.service, published.manifest_bytes, [cluster.peers[0]], 0, node.origin
            )
            node.broadcasts.append(alone)
            await asyncio.wait_for(alone.run(), STEP_TIMEOUT)
            await cluster.stop_broadcasts()
            seeder = Broadcast(
                node.service,
                published.manifest_bytes,
                cluster.peers,
                0,
                None,
                options=VIEW_OPTIONS,
            )
            node.broadcasts.append(seeder)
            await asyncio.wait_for(seeder.run(), STEP_TIMEOUT)
            assert seeder.state == "complete"
            assert stranger not in seeder.swarm.peers

            # A hostlist member outside node 0's view links to it and asks.
            recorder = Recorder(published)
            link = await connect(
                HOST,
                node.service.port,
                cluster.nodes[stranger].name,
                recorder,
                auth=node.service.auth,
                timeout=STEP_TIMEOUT,
            )
            try:
                link.send(link.conn.subscribe(image_id))
                bitfield = await recorder.wait_for(BitfieldReceived, -1)
                assert isinstance(bitfield, BitfieldReceived)
                count = manifest.chunk_count
                assert all(bit_is_set(bitfield.bits, i) for i in range(count))
                last = count - 1
                for index in (0, last):
                    link.send(link.conn.request(image_id, index))
                    await recorder.wait_for(ChunkBodyEnded, index)
                    expected = await node.origin.get_chunk(manifest.chunk(index))
                    assert recorder.bodies[index] == bytes(expected)
                # A chunk of an image node 0 does not have: refused, link kept.
                other_image = bytes(16)
                link.send(link.conn.subscribe(other_image))
                link.send(link.conn.request(other_image, 0))
                rejected = await recorder.wait_for(RequestRejected, 0)
                assert isinstance(rejected, RequestRejected)
                assert rejected.image_id == other_image
                assert recorder.closed is False and not link.closed
                # Nothing broke on node 0, and the stranger counts as a
                # subscriber like any other.
                assert seeder.error is None
                subscribed = node.service.subscribers[image_id]
                assert cluster.nodes[stranger].name in {s.peer_node for s in subscribed}
                assert set(seeder.rank_links) <= set(view)
            finally:
                await link.close()

    run_on("asyncio", main())
