"""A node's peer service and its broadcasts: where the pure layers meet I/O.

:class:`PeerService` owns the listening socket and every peer link of this
node, shared by all broadcasts running on it. :class:`Broadcast` drives one
image's :class:`~p2pcast.swarm.Swarm`: it turns the scheduler's actions into
requests on links and reads from the origin, and feeds arrivals back. Chunks
are verified (xxh3) before they are written, announced or served, and the
whole image (sha256) before it is marked complete. The contiguous run of held
chunks from the start is final once written, so each broadcast publishes it
(:class:`~p2pcast.prefix.ImagePrefix`) for staging to unpack a tar from while
the rest still arrives.

A broadcast that finds a partial copy of its image left by an earlier run
(the daemon was killed or restarted) resumes from it: before it links to any
peer it re-checks that copy chunk by chunk against the manifest in a worker
thread (:meth:`~p2pcast.store.ImageFile.scan_held`), and starts its swarm
holding the chunks that match, as if they had just arrived verified: they are
announced, served, hashed and published in the prefix; only the others are
fetched. Its progress reports them as ``resumed_chunks``/``resumed_bytes``.

A broadcast links only to its overlay neighbours (:mod:`p2pcast.overlay`:
every other node up to a few dozen, a bounded set beyond), and its swarm knows
only them. The service still accepts links from any node and serves whoever
asks, neighbour or not, within its serve slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from p2pcast import manifest as manifest_mod
from p2pcast import overlay
from p2pcast.auth import Authenticator
from p2pcast.errors import (
    ChunkCorrupt,
    IntegrityError,
    OriginError,
    P2PCastError,
    PeerError,
    PeersUnreachable,
    ProtocolError,
    StoreError,
)
from p2pcast.origins.base import Origin
from p2pcast.prefix import ImagePrefix, held_chunks, prefix_bytes
from p2pcast.protocol import (
    BitfieldReceived,
    ChunkBodyEnded,
    ChunkRequested,
    Event,
    GoodbyeCode,
    HaveReceived,
    HelloReceived,
    PeerDone,
    RequestCancelled,
    RequestRejected,
    Role,
    Subscribed,
    bit_is_set,
    pack_bits,
)
from p2pcast.store import ImageFile, NodeCache
from p2pcast.swarm import (
    ORIGIN,
    Abort,
    CancelRequest,
    Finished,
    ReadOrigin,
    RequestChunk,
    Swarm,
    SwarmConfig,
)
from p2pcast.transport import Listener, PeerLink, connect

log = logging.getLogger(__name__)

#: Back-off between connection attempts to a peer that is not up yet (s): the
#: prologs of an allocation start within ~10 ms, daemons may lag a little.
CONNECT_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)

#: After a link drops, how long reconnection is tried before the peer is
#: declared dead and its share of the origin reads is taken over (s).
RECONNECT_WINDOW = 3.0

#: A link that closes within this many seconds of coming up, without breaking
#: the protocol (a peer that authenticates and hangs up, a daemon restarting
#: in a loop), is reconnected only after the next CONNECT_BACKOFF step, and the
#: steps grow while it keeps doing so: reconnecting at once made a tight loop
#: of handshakes, at most one a second now. A link that lived longer than this
#: was working, and its loss is retried at once.
STABLE_LINK = 5.0

#: Reject reason meaning "I serve enough peers right now; ask someone else".
BUSY = "busy"

#: Reject reason answering a request the downstream cancelled while it was
#: still queued here (every request gets an answer; see p2pcast.protocol).
CANCELLED = "cancelled"

#: Origin read retries back off this long times the attempt number (s).
ORIGIN_RETRY_DELAY = 0.2


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    name: str
    host: str
    port: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclasses.dataclass(frozen=True, slots=True)
class BroadcastOptions:
    peer_timeout: float = 30.0  # s: fail if no peer at all answers within this
    linger: float = 30.0  # s: in-process fetches serve peers this long at most after finishing
    connect_timeout: float = 5.0  # s: one connection attempt
    #: Hash the image's verified prefix while chunks still arrive (a spare
    #: core turns the final sha256 check into almost nothing); False hashes
    #: it all at the end, leaving every core to the transfer.
    hash_while_receiving: bool = True
    #: The overlay (p2pcast.overlay): a node links to at most ``max_links``
    #: neighbours, and to every other node while the broadcast has at most
    #: ``full_mesh`` nodes. Every node of a broadcast must use the same
    #: values: the views are symmetric only if all compute the same graph.
    max_links: int = overlay.DEGREE
    full_mesh: int = overlay.FULL_MESH
    swarm: SwarmConfig = dataclasses.field(default_factory=SwarmConfig)


class PeerService:
    """Links of this node, shared by its broadcasts; serves chunks to peers."""

    def __init__(
        self,
        node: str,
        host: str,
        port: int,
        cache: NodeCache,
        *,
        auth: Authenticator,
        zero_copy: bool = True,
    ) -> None:
        self.node = node
        self.cache = cache
        self.zero_copy = zero_copy
        #: proves us to peers and checks them, on every link both ways
        self.auth = auth
        self.listener = Listener(host, port, node, self, auth=auth, zero_copy=zero_copy)
        self.port = self.listener.port
        self.broadcasts: dict[bytes, Broadcast] = {}
        self.out_links: dict[tuple[str, int], PeerLink] = {}
        self.connecting: dict[tuple[str, int], asyncio.Future[PeerLink]] = {}
        #: upstream links that asked about an image, answered or not yet
        self.subscribers: dict[bytes, set[PeerLink]] = {}
        self.in_links: set[PeerLink] = set()
        self.bad_links = 0
        #: Goodbyes under way to links no broadcast wants (see ``unregister``)
        self._closing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.listener.start()

    async def close(self) -> None:
        self.listener.close()
        # Connection attempts still under way end here, not in asyncio.run()'s
        # final cancellation: uvloop can finish a cancelled connect with the
        # peer's refusal instead, which that cleanup logs as an unhandled
        # exception with a traceback (seen in every cluster benchmark log).
        for pending in list(self.connecting.values()):
            pending.cancel()
        await asyncio.gather(*self.connecting.values(), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        links = list(self.out_links.values()) + list(self.in_links)
        await asyncio.gather(
            *(link.close(GoodbyeCode.SHUTTING_DOWN, "daemon stopping") for link in links),
            return_exceptions=True,
        )

    # ---- links we open (downstream role) -------------------------------------

    async def link_to(self, peer: Peer, timeout: float) -> PeerLink:
        """The (shared) downstream link to ``peer``, connecting if needed."""
        link = self.out_links.get(peer.key)
        if link is not None and not link.closed:
            return link
        pending = self.connecting.get(peer.key)
        if pending is None:
            pending = asyncio.ensure_future(
                connect(
                    peer.host,
                    peer.port,
                    self.node,
                    self,
                    auth=self.auth,
                    timeout=timeout,
                    zero_copy=self.zero_copy,
                )
            )
            self.connecting[peer.key] = pending
            # Record the link when it connects, even if the caller stopped
            # waiting meanwhile: every open link must be ours to close.
            pending.add_done_callback(lambda done: self._connected(peer.key, done))
        return await asyncio.shield(pending)

    def _connected(self, key: tuple[str, int], done: asyncio.Future[PeerLink]) -> None:
        self.connecting.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            link = done.result()
            if not link.closed:
                self.out_links[key] = link

    # ---- broadcasts ---------------------------------------------------------

    def register(self, broadcast: Broadcast) -> None:
        self.broadcasts[broadcast.image_id] = broadcast
        for link in self.subscribers.get(broadcast.image_id, ()):
            self._send_bitfield(link, broadcast)

    def unregister(self, broadcast: Broadcast) -> None:
        if self.broadcasts.get(broadcast.image_id) is broadcast:
            del self.broadcasts[broadcast.image_id]
        self._close_unwanted_links()

    def _close_unwanted_links(self) -> None:
        """Say goodbye on our links to peers that no registered broadcast wants.

        A link counts every image ever subscribed on it (the protocol has no
        Unsubscribe) and refuses a Subscribe past MAX_SUBSCRIPTIONS_PER_LINK:
        a daemon that kept its links forever could broadcast no image after
        its 64th to a peer (bench/leak_check.py found it). A link dropped once
        its broadcasts stop (cache-gc, shutdown) starts the next one afresh.
        """
        wanted = {b.peers[r].key for b in self.broadcasts.values() for r in b.view}
        for key, link in list(self.out_links.items()):
            if key in wanted or link.closed:
                continue
            del self.out_links[key]
            task = asyncio.ensure_future(link.close(GoodbyeCode.NORMAL, "no broadcast uses it"))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def announce(self, image_id: bytes, index: int) -> None:
        for link in self.subscribers.get(image_id, ()):
            if not link.closed and image_id in link.bitfield_sent:
                link.send(link.conn.have(image_id, index))

    def _send_bitfield(self, link: PeerLink, broadcast: Broadcast) -> None:
        if link.closed or broadcast.image_id in link.bitfield_sent:
            return
        link.bitfield_sent.add(broadcast.image_id)
        present = [i for i, h in enumerate(broadcast.swarm.have) if h]
        count = broadcast.manifest.chunk_count
        link.send(link.conn.bitfield(broadcast.image_id, count, pack_bits(count, present)))

    # ---- LinkHandler ----------------------------------------------------------

    def link_event(self, link: PeerLink, event: Event, body: memoryview | None) -> None:
        if isinstance(event, HelloReceived):
            if link.role is Role.UPSTREAM:
                self.in_links.add(link)
            return
        if link.role is Role.UPSTREAM:
            self._serve(link, event)
            return
        image_id = getattr(event, "image_id", None)
        broadcast = self.broadcasts.get(image_id) if image_id else None
        if broadcast is not None:
            broadcast.link_event(link, event, body)

    def _serve(self, link: PeerLink, event: Event) -> None:
        if isinstance(event, Subscribed):
            self.subscribers.setdefault(event.image_id, set()).add(link)
            broadcast = self.broadcasts.get(event.image_id)
            if broadcast is not None:
                self._send_bitfield(link, broadcast)
        elif isinstance(event, ChunkRequested):
            broadcast = self.broadcasts.get(event.image_id)
            if broadcast is None or not broadcast.swarm.have[event.index]:
                link.send(link.conn.reject(event.image_id, event.index, "not here"))
                return
            if not broadcast.swarm.accept_request(
                self._rank_key(broadcast, link),
                [self._rank_key(broadcast, other) for other in self.in_links
                 if other is not link and other.serving],
            ):  # fmt: skip
                link.send(link.conn.reject(event.image_id, event.index, BUSY))
                return
            image, index = broadcast.image, event.index
            link.send_chunk(
                event.image_id,
                index,
                lambda: None if image.closed else image.chunk_slice(index),
            )
        elif isinstance(event, RequestCancelled):
            # The request is still pending and must be answered. The event
            # only comes while it is queued (the writer answers with a Chunk
            # or a Reject as it takes a request off the queue, and a Cancel
            # arriving after that answer is dropped by the connection), so it
            # is answered here. Not queued means the link is closing.
            if link.unqueue_chunk(event.image_id, event.index):
                link.send(link.conn.reject(event.image_id, event.index, CANCELLED))
        elif isinstance(event, PeerDone):
            broadcast = self.broadcasts.get(event.image_id)
            if broadcast is not None:
                broadcast.peer_done(link.peer_node)

    def chunk_length(self, image_id: bytes, index: int) -> int | None:
        broadcast = self.broadcasts.get(image_id)
        if broadcast is None:
            return None  # stopped meanwhile: the body is read and dropped
        if not 0 <= index < broadcast.manifest.chunk_count:
            return -1  # no such chunk: no length is right
        return broadcast.manifest.chunk(index).stored_size

    @staticmethod
    def _rank_key(broadcast: Broadcast, link: PeerLink) -> int:
        """The downstream's rank in the broadcast; links from unknown nodes get
        distinct negative keys (they still count against the serve slots)."""
        rank = broadcast.rank_by_name.get(link.peer_node or "")
        return rank if rank is not None else -2 - id(link)

    def link_closed(self, link: PeerLink, error: P2PCastError | None) -> None:
        if isinstance(error, ProtocolError):
            self.bad_links += 1  # closed for breaking the protocol (logged by the link)
        if link.role is Role.UPSTREAM:
            self.in_links.discard(link)
            for image_id, links in list(self.subscribers.items()):
                links.discard(link)
                if not links:  # else one empty set per image ever asked about, forever
                    del self.subscribers[image_id]
            return
        for key, known in list(self.out_links.items()):
            if known is link:
                del self.out_links[key]
        for broadcast in list(self.broadcasts.values()):
            broadcast.link_lost(link, error)


class Broadcast:
    """One image arriving at (or seeded from) this node."""

    def __init__(
        self,
        service: PeerService,
        manifest_bytes: bytes,
        peers: list[Peer],
        rank: int,
        origin: Origin | None,
        *,
        job: str = "",
        options: BroadcastOptions = BroadcastOptions(),
        rng: random.Random | None = None,
        requested_at: float | None = None,
    ) -> None:
        self.service = service
        self.manifest = manifest_mod.decode(manifest_bytes)
        self.image_id = manifest_mod.image_id_of(manifest_bytes)
        self.peers = peers
        self.rank = rank
        self.origin = origin
        self.job = job
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.image: ImageFile = service.cache.open(manifest_bytes)
        have = range(self.manifest.chunk_count) if self.image.complete else ()
        #: the ranks this node links to and exchanges with (its overlay
        #: neighbours); any node may still link to us and be served
        self.view = overlay.neighbours(
            rank, len(peers), degree=options.max_links, full_mesh=options.full_mesh
        )
        self.rng = rng or random.Random()
        self.swarm = self._new_swarm(have)
        #: chunks (and their stored bytes) of a partial copy from an earlier
        #: run that matched the manifest and were kept (see _resume)
        self.resumed_chunks = 0
        self.resumed_bytes = 0
        #: the re-check of that partial copy, while it runs in a thread
        self.scanning: asyncio.Future[list[int]] | None = None
        self.stopped = False
        self.state = "complete" if self.image.complete else "fetching"
        self.error: P2PCastError | None = None
        #: when it was asked for (wall clock): progress times count from here,
        #: so fetching the manifest and setting up are included
        self.started = requested_at or time.time()
        self.finished_at: float | None = self.started if self.image.complete else None
        self.cached = self.image.complete
        #: when the last chunk arrived (before the whole-image check)
        self.transfer_done_at: float | None = self.finished_at
        self.wakeup = asyncio.Event()
        self.hash_frontier = 0  # chunks before this index are fed to the sha256
        #: chunks before this index are all held (xxh3-checked and written);
        #: unlike hash_frontier it never lags behind a hashing thread
        self.held_frontier = len(have)
        #: the verified prefix for readers in other threads (staging unpacks
        #: a tar from it while chunks still arrive)
        self.prefix = ImagePrefix(self.manifest.name, self.manifest.size)
        self.hashing: asyncio.Future[None] | None = None
        self.done = asyncio.Event()
        self.links: dict[PeerLink, int] = {}
        self.rank_by_name = {peer.name: rank for rank, peer in enumerate(peers)}
        self.rank_links: dict[int, PeerLink] = {}
        self.ever_connected: set[int] = set()
        self.connect_errors: dict[int, str] = {}
        self.peers_done: set[str] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.listeners: list[Callable[[], None]] = []
        if self.cached:
            self.prefix.verified()
            self.done.set()

    @property
    def held_prefix(self) -> int:
        """Bytes at the start of the image file that are held and trustworthy.

        The cache file holds the raw image at its offsets (compressed chunks
        are decoded before they are written), so these bytes are the image's.
        """
        return prefix_bytes(self.held_frontier, self.manifest.chunk_size, self.manifest.size)

    def _new_swarm(self, have: Iterable[int]) -> Swarm:
        return Swarm(
            chunk_sizes=[c.stored_size for c in self.manifest.chunks()],
            rank=self.rank,
            size=len(self.peers),
            now=self.loop.time(),
            rng=self.rng,
            config=self.options.swarm,
            have=have,
            view=self.view,
        )

    # ---- lifecycle ----------------------------------------------------------

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        """Fetch until complete (or fail); peers keep being served afterwards."""
        self.service.register(self)
        if self.image.resumed:
            # Before any link: the swarm is rebuilt with what the scan found,
            # and peers' bitfields and requests must reach the rebuilt one.
            try:
                await self._resume()
            except P2PCastError as exc:
                self.fail(exc)
                self.done.set()
                self._notify()
                raise
            if self.stopped:
                self.done.set()  # as a cancelled run would have
                return
        for rank in self.view:
            peer = self.peers[rank]
            self.spawn(self._keep_link(rank, peer), f"link {peer.name}")
        if self.cached:
            return
        try:
            await self._schedule_loop()
            self.transfer_done_at = time.time()
            self.state = "verifying"
            self._notify()
            while self.hashing is not None and not self.hashing.done():
                await asyncio.wait([self.hashing])  # its errors arrive via _hashed
            if self.error is not None:
                raise self.error
            await asyncio.to_thread(self.image.verify_image)
            self.image.mark_complete()
            self.prefix.verified()
            self.state = "complete"
            self.finished_at = time.time()
            for link in self.rank_links.values():
                if not link.closed:
                    link.send(link.conn.done(self.image_id))
        except P2PCastError as exc:
            self.fail(exc)
        finally:
            self.done.set()
            self._notify()
        if self.error is not None:
            raise self.error

    async def _resume(self) -> None:
        """Start from the chunks of an earlier run's partial copy that verify."""
        if self.stopped:
            return
        started = time.monotonic()
        self.scanning = asyncio.ensure_future(asyncio.to_thread(self.image.scan_held))
        # Shielded: a cancelled run() must not leave the thread reading a file
        # that stop() closes; stop() waits for the scan instead.
        held = await asyncio.shield(self.scanning)
        if self.stopped or not held:
            return
        self.swarm = self._new_swarm(held)
        self.resumed_chunks = len(held)
        self.resumed_bytes = sum(self.manifest.chunk(i).stored_size for i in held)
        self.held_frontier = held_chunks(self.swarm.have, 0)
        self.prefix.advance(self.held_prefix)
        for index in held:  # to upstream links that got an empty bitfield meanwhile
            self.service.announce(self.image_id, index)
        log.info(
            "resuming %s: %d of %d chunks (%d bytes) of the partial copy verified in %.2f s",
            self.manifest.name, len(held), self.manifest.chunk_count, self.resumed_bytes,
            time.monotonic() - started,
        )  # fmt: skip
        self._notify()
        self._hash_prefix()

    def fail(self, exc: P2PCastError) -> None:
        if self.error is None:
            self.error = exc
            self.state = "failed"
            self.finished_at = time.time()
            log.error("broadcast of %s failed: %s", self.manifest.name, exc)
        self.prefix.fail(exc)
        self.wakeup.set()

    async def stop(self, *, keep_partial: bool = False) -> None:
        """Stop fetching and serving; an incomplete image is removed from the
        cache unless ``keep_partial`` (the daemon is stopping: a restart
        resumes from it, re-checking every chunk)."""
        self.stopped = True
        # First: a staging thread waiting for more of the image must not wait
        # for a broadcast that is going away (a no-op once verified).
        self.prefix.fail("the broadcast was stopped")
        self.service.unregister(self)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # The hashing and scanning threads read the image's fds: never close
        # them under those.
        for thread in (self.hashing, self.scanning):
            if thread is not None:
                await asyncio.gather(thread, return_exceptions=True)
        if self.state != "complete":
            self.image.close()
            if not keep_partial:
                self.service.cache.discard(self.image_id)
        else:
            self.image.close()

    async def linger(self) -> None:
        """Serve our neighbours until all have the image, or the linger time ends.

        Only neighbours are waited for: the others fetch from theirs.
        """
        deadline = self.loop.time() + self.options.linger
        while self.loop.time() < deadline:
            alive = {r for r, p in self.swarm.peers.items() if not p.dead}
            if all(self.peers[r].name in self.peers_done for r in alive):
                return
            if not alive:
                return
            await asyncio.sleep(0.1)

    # ---- the scheduler loop ---------------------------------------------------

    async def _schedule_loop(self) -> None:
        deadline_unreachable = self.loop.time() + self.options.peer_timeout
        while True:
            if self.error is not None:
                raise self.error
            now = self.loop.time()
            for action in self.swarm.poll(now):
                if isinstance(action, Finished):
                    return
                if isinstance(action, Abort):
                    raise (ChunkCorrupt if action.corrupt else OriginError)(action.reason)
                self._act(action)
            if len(self.peers) > 1 and not self.ever_connected and now > deadline_unreachable:
                detail = ", ".join(
                    f"{self.peers[r].name} ({why})"
                    for r, why in sorted(self.connect_errors.items())
                )
                raise PeersUnreachable(
                    f"no peer answered within {self.options.peer_timeout:g} s: {detail}"
                )
            deadline = self.swarm.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - now)
            if not self.ever_connected and len(self.peers) > 1:
                timeout = 1.0 if timeout is None else min(timeout, 1.0)
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _act(self, action: RequestChunk | ReadOrigin | CancelRequest) -> None:
        if isinstance(action, RequestChunk):
            link = self.rank_links.get(action.peer)
            if link is None or link.closed:
                self.swarm.chunk_failed(action.index, action.peer, self.loop.time(), corrupt=False)
                self.wakeup.set()
                return
            if link.conn.is_pending(self.image_id, action.index):
                # A request we cancelled for this chunk is still unanswered on
                # this link, and a second one would break the protocol. As a
                # "busy" answer: the swarm backs off this peer a moment and
                # asks again later (the answer will have come), or elsewhere.
                self.swarm.chunk_failed(
                    action.index, action.peer, self.loop.time(), corrupt=False, busy=True
                )
                self.wakeup.set()
                return
            link.send(link.conn.request(self.image_id, action.index))
        elif isinstance(action, CancelRequest):
            link = self.rank_links.get(action.peer)
            # Not pending: the answer arrived meanwhile (a chunk header is
            # enough), or the link is new. One Cancel per request at most.
            if (
                link is not None
                and not link.closed
                and link.conn.may_cancel(self.image_id, action.index)
            ):
                link.send(link.conn.cancel(self.image_id, action.index))
        else:
            owner = self.swarm.owner(action.index)
            if owner != self.swarm.rank:
                log.info(
                    "reading chunk %d (owner rank %d) from the origin: slow %s, dead %s",
                    action.index, owner, sorted(self.swarm.slow),
                    sorted(r for r, p in self.swarm.peers.items() if p.dead),
                )  # fmt: skip
            self.spawn(self._read_origin(action.index), f"origin {action.index}")

    async def _read_origin(self, index: int) -> None:
        chunk = self.manifest.chunk(index)
        failures = self.swarm.origin_failures.get(index, 0)
        if failures:
            await asyncio.sleep(ORIGIN_RETRY_DELAY * failures)
        if self.origin is None:
            self.fail(OriginError("the image is not cached and no origin is configured"))
            return
        try:
            data = await self.origin.get_chunk(chunk)
            self.image.write_chunk(index, data)
        except ChunkCorrupt as exc:
            log.warning("origin chunk %d of %s: %s", index, self.manifest.name, exc)
            self.swarm.chunk_failed(index, ORIGIN, self.loop.time(), corrupt=True)
        except OriginError as exc:
            log.warning("origin read of chunk %d failed: %s", index, exc)
            self.swarm.chunk_failed(index, ORIGIN, self.loop.time(), corrupt=False)
        except P2PCastError as exc:  # the store: a full disk is fatal
            self.fail(exc)
        else:
            self._arrived(index, ORIGIN)
        self.wakeup.set()

    def _arrived(self, index: int, source: int) -> None:
        fresh = not self.swarm.have[index]
        self.swarm.chunk_received(index, source, self.loop.time())
        if fresh:
            self.service.announce(self.image_id, index)
            if index == self.held_frontier:
                self.held_frontier = held_chunks(self.swarm.have, index)
                self.prefix.advance(self.held_prefix)
            self._notify()
            self._hash_prefix()

    def _hash_prefix(self) -> None:
        """Hash the image's verified prefix in the background, one run at a time."""
        if not self.options.hash_while_receiving:
            return
        if self.hashing is not None and not self.hashing.done():
            return
        index = held_chunks(self.swarm.have, self.hash_frontier)
        if index == self.hash_frontier:
            return
        self.hash_frontier = index
        end = min(index * self.manifest.chunk_size, self.manifest.size)
        self.hashing = asyncio.ensure_future(asyncio.to_thread(self.image.hash_upto, end))
        self.hashing.add_done_callback(self._hashed)

    def _hashed(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, P2PCastError):
            self.fail(exc)
        elif isinstance(exc, OSError):
            self.fail(StoreError(f"reading back {self.image.image_path}: {exc}"))
        elif exc is None and self.state == "fetching":
            self._hash_prefix()

    # ---- peer links -----------------------------------------------------------

    async def _keep_link(self, rank: int, peer: Peer) -> None:
        """Keep a downstream link to one peer; declare it dead if it stays away."""
        attempt = 0
        flaps = 0  # links in a row that closed within STABLE_LINK of coming up
        give_up = self.loop.time() + self.options.peer_timeout
        while True:
            try:
                link = await self.service.link_to(peer, self.options.connect_timeout)
            except PeerError as exc:
                self.connect_errors[rank] = str(exc).rsplit(": ", 1)[-1]
                # A peer we had, whose host now refuses connections, has lost
                # its daemon: waiting out the window would only stall others.
                gone = rank in self.ever_connected and isinstance(
                    exc.__cause__, ConnectionRefusedError
                )
                if gone or self.loop.time() > give_up:
                    log.warning("peer %s unreachable: %s", peer.name, exc)
                    self.swarm.peer_dead(rank, self.loop.time())
                    self.wakeup.set()
                    return
                await asyncio.sleep(CONNECT_BACKOFF[min(attempt, len(CONNECT_BACKOFF) - 1)])
                attempt += 1
                continue
            attempt = 0
            self.ever_connected.add(rank)
            self.links[link] = rank
            self.rank_links[rank] = link
            link.send(link.conn.subscribe(self.image_id))
            self.swarm.peer_up(rank, self.loop.time())
            self.wakeup.set()
            if self.state == "complete":
                link.send(link.conn.done(self.image_id))
            up_since = self.loop.time()
            while not link.closed:
                await link.lost.wait()
            if self.swarm.peers[rank].banned:
                return
            if self.loop.time() - up_since < STABLE_LINK:
                await asyncio.sleep(CONNECT_BACKOFF[min(flaps, len(CONNECT_BACKOFF) - 1)])
                flaps += 1
            else:
                flaps = 0
            give_up = self.loop.time() + RECONNECT_WINDOW

    def link_lost(self, link: PeerLink, error: P2PCastError | None) -> None:
        rank = self.links.pop(link, None)
        if rank is None:
            return
        if self.rank_links.get(rank) is link:
            del self.rank_links[rank]
        log.info("link to %s lost: %s", self.peers[rank].name, error or "closed")
        if isinstance(error, ProtocolError):
            # It broke the protocol (lying lengths, garbage): never again here.
            self.swarm.peer_banned(rank, self.loop.time())
        else:
            self.swarm.peer_down(rank, self.loop.time())
        self.wakeup.set()

    def peer_done(self, node: str | None) -> None:
        if node:
            self.peers_done.add(node)

    def link_event(self, link: PeerLink, event: Event, body: memoryview | None) -> None:
        rank = self.links.get(link)
        if rank is None:
            return
        now = self.loop.time()
        if isinstance(event, BitfieldReceived):
            if event.chunk_count != self.manifest.chunk_count:
                link.abort(PeerError(f"{link.peer_node} has another chunk count for the image"))
                return
            present = [i for i in range(event.chunk_count) if bit_is_set(event.bits, i)]
            self.swarm.bitfield(rank, present, now)
        elif isinstance(event, HaveReceived):
            if event.index < self.manifest.chunk_count:
                self.swarm.have_announced(rank, event.index, now)
        elif isinstance(event, ChunkBodyEnded):
            assert body is not None
            if self.swarm.have[event.index]:
                self.swarm.chunk_received(event.index, rank, now)  # a crossed duplicate
            else:
                try:
                    self.image.write_chunk(event.index, body)
                except IntegrityError as exc:
                    log.warning("banning %s: %s", link.peer_node, exc)
                    self.swarm.chunk_failed(event.index, rank, now, corrupt=True)
                except P2PCastError as exc:
                    self.fail(exc)
                else:
                    self._arrived(event.index, rank)
        if self.swarm.peers[rank].announced == self.manifest.chunk_count:
            self.peers_done.add(self.peers[rank].name)  # it holds everything
        if isinstance(event, RequestRejected) and event.reason != CANCELLED:
            # A "cancelled" Reject answers a request the swarm gave up when it
            # cancelled it: nothing failed, and the peer does hold the chunk
            # (a non-busy failure would forget that it does).
            busy = event.reason == BUSY
            self.swarm.chunk_failed(event.index, rank, now, corrupt=False, busy=busy)
        self.wakeup.set()

    # ---- progress -------------------------------------------------------------

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def progress(self) -> dict[str, Any]:
        now = time.time()
        end = self.finished_at or now
        elapsed = max(end - self.started, 1e-9)
        done_bytes = (
            sum(c.stored_size for c in self.manifest.chunks() if self.swarm.have[c.index])
            if self.state == "fetching"
            else self.manifest.stored_total
        )
        return {
            "image_id": self.image_id.hex(),
            "name": self.manifest.name,
            "job": self.job,
            "state": self.state,
            "error": str(self.error) if self.error else None,
            "chunks_done": self.swarm.have_count,
            "chunks_total": self.manifest.chunk_count,
            "bytes_done": done_bytes,
            "bytes_total": self.manifest.stored_total,
            "size": self.manifest.size,
            "seconds": round(elapsed, 4),
            "transfer_seconds": round((self.transfer_done_at or end) - self.started, 4),
            # resumed bytes came from this node's disk, not over the network
            "rate": (done_bytes - self.resumed_bytes) / elapsed if not self.cached else 0.0,
            "from_origin": self.swarm.bytes_from_origin,
            "from_peers": self.swarm.bytes_from_peers,
            # chunks of a partial copy from an earlier run that verified again
            "resumed_chunks": self.resumed_chunks,
            "resumed_bytes": self.resumed_bytes,
            # what this node's origin client actually read (all its broadcasts)
            "origin_bytes_read": self.origin.bytes_read if self.origin else 0,
            "cached": self.cached,
            "requests_sent": self.swarm.requests_sent,
            "busy_answers": self.swarm.busy_answers,
            "dead_peers": sorted(
                self.peers[r].name for r, p in self.swarm.peers.items() if p.dead or p.banned
            ),
            "path": str(self.image.image_path),
            "image_type": self.manifest.image_type,
        }
