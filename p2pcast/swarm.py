"""The swarm scheduler of one node in one broadcast: pure, sans-IO.

It decides which chunk to ask of whom, and which chunks to read from the
origin. Inputs are events (a peer announced a chunk, a chunk arrived and
verified, a link went down) with the current time ``now``; outputs are
actions returned by :meth:`Swarm.poll`. No sockets, files, clocks or global
randomness: the same object runs in the daemon, in the in-memory test network
and in the simulator.

The plan it follows, and why:

* **Scattered origin reads.** Chunk ``i`` is read from the origin by rank
  ``i mod N`` (its *owner*). Interleaving means every node has something to
  offer from the first chunk on, and the origin serves each chunk once.
* **A ring first, the mesh when it pays.** Each node asks its ring
  predecessor first: every node is the preferred upstream of exactly one
  other, so each uplink has one dedicated consumer, as in a ring allgather
  (in ~ out ~ S per node: the floor S/B). A small extra window lets a node
  also pull from any other holder, which keeps links busy at start-up and
  routes around a slow or dead predecessor.
* **Owners that are slow or gone are replaced.** An owner whose announced
  progress on its own chunks falls far behind the others' (or whose link is
  declared dead) loses its unannounced chunks to the next healthy rank, which
  every node computes alike from what it sees, so the reassignment needs no
  extra messages. A node that sees itself slow stops reading new chunks.
* **Nothing can stall forever.** A request unanswered past a deadline is
  cancelled and asked elsewhere; a chunk that nobody has after a stall timeout
  is read from the origin by whoever needs it.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import statistics
from collections.abc import Iterable, Sequence

#: How many healthy ranks after a dead or slow owner share its chunks.
BACKUP_SPREAD = 3

#: Source id meaning "the origin" in actions and events.
ORIGIN = -1

#: At most this many ranks read from the origin (chunk i is read by rank
#: i mod owners). All owners read at once and the origin splits its link
#: evenly among them, so with an owner per chunk (thousands of nodes, a few
#: hundred chunks) no chunk arrives before ~S / origin rate and the swarm
#: idles until then; fewer owners, each reading its chunks in order two at a
#: time, stream chunks out from the start. 64 keeps every cluster of up to 64
#: nodes exactly as before (16 owners made N=64 ~3 % slower in the simulator)
#: and covers an origin up to ~64x faster than a node's link. A constant, not
#: a SwarmConfig field: every node must compute the same owners.
MAX_OWNERS = 64


@dataclasses.dataclass(frozen=True, slots=True)
class SwarmConfig:
    #: Requests in flight to one peer: one being sent and one queued behind it,
    #: so the upstream never waits a round trip between two chunks.
    peer_window: int = 2
    #: Requests in flight from all peers together. Beyond peer_window,
    #: those slots pull from other holders (rarest first) and keep links busy.
    total_window: int = 4
    #: Origin reads in flight. One: a 4 MiB GET is ~10 ms on RGW, little
    #: next to a chunk's link time, and a second stream from an origin faster
    #: than our link crowds out the peers (N=4, 100 Mbit/s: 1.19-1.33 x S/B
    #: with 2, 1.13 with 1).
    origin_window: int = 1
    #: Own chunks read ahead of the swarm's progress (see ``_origin_due``).
    origin_lead: int = 2
    #: How long owners are given before their progress is judged (s): origin
    #: connections and the first reads take a moment everywhere.
    takeover_grace: float = 2.0
    #: An owner is slow when it has read less than this fraction of the share
    #: of its chunks that the swarm's progress calls for (see ``_judge``) ...
    slow_fraction: float = 0.5
    #: ... by more than this many chunks (one chunk of lag is one transfer).
    slow_lag_chunks: int = 1
    #: A node holding less than this fraction of the median node's chunks ...
    straggler_fraction: float = 0.4
    #: ... and at least this many fewer is a straggler (see ``_judge``).
    #: Chunks complete in bursts (five streams share a link, each chunk takes
    #: five chunk times): with 4, healthy nodes of an emulated 4-node cluster
    #: were judged stragglers one after another and 45 % of the image was
    #: read twice.
    straggler_lag_chunks: int = 8
    #: ... for at least this long (s).
    straggler_persist: float = 3.0
    #: A request older than this many expected chunk times is given up (s).
    request_timeout_chunks: float = 8.0
    #: Floor of the request timeout (s): scheduling noise on a loaded node.
    request_timeout_min: float = 5.0
    #: With no chunk arriving for this long, read a needed chunk that no peer
    #: offers from the origin ourselves (s).
    stall_timeout: float = 5.0
    #: Initial estimate of one link's rate (bytes/s) until chunks are measured.
    initial_rate: float = 100e6
    #: How often owners' progress is re-judged (s).
    judge_interval: float = 0.5
    #: Reads of one chunk from the origin that may fail before giving up.
    max_origin_failures: int = 5
    #: Downstreams an upstream serves at once (besides its ring successor).
    #: Beyond this it answers "busy": a request stuck behind many others on
    #: one uplink is worse than the same request sent to an idle holder.
    serve_slots: int = 2
    #: After a "busy" answer, leave that peer alone this many chunk times ...
    busy_backoff_chunks: float = 2.0
    #: ... but never longer than this (s): a busy upstream frees a slot within
    #: a chunk time or two, even on slow links (4 MiB at 10 Mbit/s: 3.4 s).
    busy_backoff_max: float = 5.0
    #: Downstreams served beyond serve_slots, only for neighbours that have
    #: announced fewer than ``starter_chunks`` chunks: at start-up a holder's
    #: slots otherwise go to nodes that already hold (and serve) chunks while
    #: most nodes wait with idle uplinks (see ``accept_request``).
    starter_slots: int = 1
    starter_chunks: int = 1


# ---- actions (what the driver must do) ------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RequestChunk:
    peer: int
    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReadOrigin:
    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class CancelRequest:
    peer: int
    index: int


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Abort:
    reason: str
    corrupt: bool = False  # the origin kept serving bytes that fail their hash


Action = RequestChunk | ReadOrigin | CancelRequest | Finished | Abort


@dataclasses.dataclass(slots=True)
class _Peer:
    rank: int
    chunk_count: int
    up: bool = False
    dead: bool = False
    banned: bool = False
    done: bool = False
    bits: bytearray = dataclasses.field(default_factory=bytearray)
    #: index -> time requested
    inflight: dict[int, float] = dataclasses.field(default_factory=dict)
    #: chunks this peer has that we may still want (stale entries pruned lazily)
    offers: set[int] = dataclasses.field(default_factory=set)
    owned_progress: int = 0
    announced: int = 0  # chunks this peer told us it holds
    rate: float = 0.0
    busy_until: float = 0.0
    #: chunks whose request to this peer timed out
    timed_out: set[int] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.bits = bytearray(self.chunk_count)

    @property
    def usable(self) -> bool:
        return self.up and not self.dead and not self.banned


class Swarm:
    """Scheduler state of one node (rank ``rank`` of ``size``) in one swarm."""

    def __init__(
        self,
        *,
        chunk_sizes: Sequence[int],
        rank: int,
        size: int,
        now: float,
        rng: random.Random,
        config: SwarmConfig = SwarmConfig(),
        have: Iterable[int] = (),
        view: Iterable[int] | None = None,
    ) -> None:
        """``view``: the ranks this node exchanges with (see p2pcast.overlay);
        every other rank when omitted. It must hold the ring predecessor and
        successor: the ring preference and owner takeover rely on them."""
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside 0..{size - 1}")
        ranks = sorted(set(range(size) if view is None else view) - {rank})
        if size > 1 and not {(rank - 1) % size, (rank + 1) % size} <= set(ranks):
            raise ValueError(f"view of rank {rank} lacks its ring neighbours")
        if ranks and not 0 <= ranks[0] <= ranks[-1] < size:
            raise ValueError(f"view of rank {rank} holds ranks outside 0..{size - 1}")
        self.config = config
        self.rank = rank
        self.size = size
        self.rng = rng
        self.chunk_sizes = tuple(chunk_sizes)
        self.chunk_count = len(self.chunk_sizes)
        self.owners = min(size, MAX_OWNERS)
        self.started = now
        self.have = bytearray(self.chunk_count)
        self.have_count = 0
        for index in have:
            if not self.have[index]:
                self.have[index] = 1
                self.have_count += 1
        #: index -> (source, time requested)
        self.inflight: dict[int, tuple[int, float]] = {}
        self.origin_inflight = 0
        self.origin_queue: list[int] = []
        self.origin_failures: dict[int, int] = {}
        self.peers: dict[int, _Peer] = {r: _Peer(r, self.chunk_count) for r in ranks}
        #: the view by ring distance behind us: preferred() walks it in order
        self.ring_behind = sorted(ranks, key=lambda r: (rank - r) % size)
        #: how many peers announced each chunk, for rarest-first choice
        self.holders = [0] * self.chunk_count
        self.slow: set[int] = set()
        #: owners some of whose chunks we read in their place
        self.taken_over: set[int] = set()
        #: rank -> when it was first seen lagging far behind (see ``_judge``)
        self.lagging_since: dict[int, float] = {}
        #: Among equally rare chunks, each node starts at its own point of the
        #: image once some peer is judged slow: two nodes pulling the same
        #: lowest-index chunks from one holder get them at the same moment and
        #: have nothing to swap (a straggler's backup then fed its two
        #: neighbours the same chunks twice over its one uplink). Only then:
        #: in a healthy swarm the lowest index first keeps everyone on the
        #: chunks that were injected first, and the rotation cost the
        #: simulator 0.02-0.04 x S/B at 256-1024 nodes (1 GiB, 100 Mbit/s).
        self.tie_offset = rank * self.chunk_count // size
        self.owned_progress = 0
        #: last sign of progress: a chunk arrived, or a peer announced one.
        #: News counts because over a partial view a node may wait a while
        #: for the first chunks to fan out to its neighbourhood; that is not
        #: a stall, and thousands of nodes reading from the origin at once
        #: would swamp it.
        self.last_arrival = now
        self.stall_checked = now
        self.next_judge = now + config.takeover_grace
        self.finished_sent = False
        self.last_poll = now
        self.aborted: str | None = None
        self.aborted_corrupt = False
        self.bytes_from_origin = 0
        self.busy_answers = 0  # requests a peer declined as busy (load spreading)
        self.requests_sent = 0
        self.bytes_from_peers = 0
        #: cached _expected_chunk_time(): None once a peer's rate changes
        self._chunk_time: float | None = None
        for index in self.owned(rank):
            if not self.have[index]:
                self.origin_queue.append(index)
            else:
                self.owned_progress += 1
        heapq.heapify(self.origin_queue)

    # ---- queries ----------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.have_count == self.chunk_count

    def owner(self, index: int) -> int:
        return index % self.owners

    def owned(self, rank: int) -> range:
        """The chunks rank ``rank`` reads from the origin (none past the owners)."""
        return range(rank, self.chunk_count, self.owners) if rank < self.owners else range(0)

    def preferred(self) -> int | None:
        """The ring predecessor, skipping ranks known to be dead or slow.

        Only ranks in the view count: past a dead predecessor, the next one
        behind it that we see.
        """
        for rank in self.ring_behind:
            peer = self.peers[rank]
            if not peer.dead and not peer.banned and rank not in self.slow:
                return rank
        return None

    def backup_owner(self, index: int) -> int:
        """Who reads chunk ``index`` from the origin: its owner if healthy,
        else one of the first ``BACKUP_SPREAD`` healthy ranks after it, by index.

        Spreading matters: a single backup reads twice the share over one
        downlink, and the others wait for it (simulated N=4 with a quarter-rate
        node: the others at 1.5x their fault-free time with one backup).

        A rank outside our view counts as healthy (we cannot judge it), so
        the walk stops after at most one rank per view member. Owners' ring
        successors see them, so a dead owner's backups do know they are.
        """
        owner = self.owner(index)
        healthy: list[int] = []
        for step in range(self.size):
            rank = (owner + step) % self.size
            if rank == self.rank:
                ok = rank not in self.slow
            else:
                peer = self.peers.get(rank)
                ok = peer is None or not (peer.dead or peer.banned or rank in self.slow)
            if ok:
                if step == 0:
                    return rank
                healthy.append(rank)
                if len(healthy) == BACKUP_SPREAD:
                    break
        if not healthy:
            return self.rank
        return healthy[(index // self.owners) % len(healthy)]

    def next_deadline(self) -> float | None:
        if self.complete or self.aborted:
            return None
        stall_base = max(self.last_arrival, self.stall_checked)
        deadlines = [self.next_judge, stall_base + self.config.stall_timeout]
        timeout = self._request_timeout()
        deadlines.extend(t + timeout for src, t in self.inflight.values() if src != ORIGIN)
        deadlines.extend(p.busy_until for p in self.peers.values() if p.busy_until > self.last_poll)
        return min(deadlines)

    # ---- events -----------------------------------------------------------

    def peer_up(self, rank: int, now: float) -> None:
        peer = self.peers[rank]
        peer.up = True

    def peer_down(self, rank: int, now: float) -> None:
        """The link to ``rank`` closed; it may come back (peer_up) or die."""
        peer = self.peers[rank]
        peer.up = False
        for index in list(peer.inflight):
            self._drop_inflight(index)
        peer.inflight.clear()

    def peer_dead(self, rank: int, now: float) -> None:
        self.peer_down(rank, now)
        self.peers[rank].dead = True
        self._reassign()

    def peer_banned(self, rank: int, now: float) -> None:
        """The peer sent corrupt data: never ask it again in this swarm."""
        self.peers[rank].banned = True
        self.peer_down(rank, now)
        self._reassign()

    def bitfield(self, rank: int, present: Iterable[int], now: float) -> None:
        for index in present:
            self.have_announced(rank, index, now)

    def have_announced(self, rank: int, index: int, now: float) -> None:
        peer = self.peers[rank]
        if peer.bits[index]:
            return
        peer.bits[index] = 1
        peer.announced += 1
        self.last_arrival = now
        if self.owner(index) == rank:
            peer.owned_progress += 1
        self.holders[index] += 1
        if not self.have[index]:
            peer.offers.add(index)

    def peer_done(self, rank: int, now: float) -> None:
        self.peers[rank].done = True

    def chunk_received(self, index: int, source: int, now: float) -> None:
        """Chunk ``index`` arrived from ``source`` and passed its hash check."""
        size = self.chunk_sizes[index]
        requested = self._drop_inflight(index)
        if source == ORIGIN:
            self.bytes_from_origin += size
        else:
            self.bytes_from_peers += size
            peer = self.peers[source]
            peer.inflight.pop(index, None)
            if requested is not None and now > requested:
                sample = size / (now - requested)
                peer.rate = sample if not peer.rate else 0.7 * peer.rate + 0.3 * sample
                self._chunk_time = None
        if self.have[index]:
            return  # a duplicate (a cancelled request that crossed): nothing new
        self.have[index] = 1
        self.have_count += 1
        self.last_arrival = now
        if self.owner(index) == self.rank:
            self.owned_progress += 1

    def chunk_failed(
        self, index: int, source: int, now: float, *, corrupt: bool, busy: bool = False
    ) -> None:
        """A request failed: rejected (busy: the peer serves enough others now),
        a link error, or (corrupt) bad bytes."""
        # A late answer to a request we cancelled and re-sent elsewhere must
        # not forget the new request.
        self._drop_inflight(index, source)
        if source == ORIGIN:
            failures = self.origin_failures.get(index, 0) + 1
            self.origin_failures[index] = failures
            if failures >= self.config.max_origin_failures:
                what = "was corrupt" if corrupt else "failed"
                self.aborted = f"chunk {index} {what} {failures} times from the origin"
                self.aborted_corrupt = corrupt
            else:
                heapq.heappush(self.origin_queue, index)
            return
        peer = self.peers[source]
        peer.inflight.pop(index, None)
        if corrupt:
            self.peer_banned(source, now)
        elif busy:
            self.busy_answers += 1
            backoff = self.config.busy_backoff_chunks * self._expected_chunk_time()
            # Capped: the chunk time comes from measured rates, which timeouts
            # halve again and again (a peer with none gets 1 B/s); uncapped, a
            # simulated node waited out a back-off of 8.4 million seconds.
            peer.busy_until = now + min(backoff, self.config.busy_backoff_max)
        elif peer.bits[index]:
            peer.bits[index] = 0  # it does not have it after all
            peer.announced -= 1
            self.holders[index] -= 1

    # ---- the decision -----------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        """Everything to do now; call after every event and at next_deadline()."""
        if self.aborted:
            return [Abort(self.aborted, self.aborted_corrupt)]
        if self.complete:
            if self.finished_sent:
                return []
            self.finished_sent = True
            return [Finished()]
        actions: list[Action] = []
        self.last_poll = now
        if now >= self.next_judge:
            self.next_judge = now + self.config.judge_interval
            self._judge(now)
        self._expire_requests(now, actions)
        self._stall_fallback(now)
        self._schedule_peers(now, actions)
        self._schedule_origin(now, actions)
        return actions

    def on_timer(self, now: float) -> list[Action]:
        return self.poll(now)

    # ---- internals --------------------------------------------------------

    def _drop_inflight(self, index: int, source: int | None = None) -> float | None:
        """Forget the request for ``index`` (only if it went to ``source``, if given)."""
        entry = self.inflight.get(index)
        if entry is None or (source is not None and entry[0] != source):
            return None
        del self.inflight[index]
        source, started = entry
        if source == ORIGIN:
            self.origin_inflight -= 1
        else:
            peer = self.peers[source]
            peer.inflight.pop(index, None)
            if peer.bits[index] and not self.have[index]:
                peer.offers.add(index)
        return started

    def _expected_chunk_time(self) -> float:
        # Cached: asked several times per poll, it changes only with a rate.
        if self._chunk_time is None:
            rates = [p.rate for p in self.peers.values() if p.rate]
            rate = max(rates) if rates else self.config.initial_rate
            self._chunk_time = max(self.chunk_sizes, default=0) / rate
        return self._chunk_time

    def _request_timeout(self) -> float:
        return max(
            self.config.request_timeout_min,
            self.config.request_timeout_chunks * self._expected_chunk_time(),
        )

    def _expire_requests(self, now: float, actions: list[Action]) -> None:
        timeout = self._request_timeout()
        for index, (source, started) in list(self.inflight.items()):
            # The same sum as in next_deadline(): ``now - started < timeout``
            # can stay true at that very deadline (rounding) and spin the timer.
            if started + timeout > now:
                continue
            if source == ORIGIN:
                continue  # the driver bounds origin reads with its own retries
            self._drop_inflight(index)
            peer = self.peers[source]
            peer.rate = peer.rate / 2 if peer.rate else 1.0
            self._chunk_time = None
            # Ask someone else if anyone else has it (see _next_offer).
            peer.timed_out.add(index)
            actions.append(CancelRequest(source, index))

    def _judge(self, now: float) -> None:
        """Mark owners slow whose origin reads lag far behind the broadcast.

        The clock is the swarm's median progress (chunks held, as announced),
        which every node sees alike: by the time the median node holds a
        fraction f of the image, each owner must have read about f of its own
        chunks, or those chunks cannot reach everyone in time. Comparing owners
        with each other instead (the median owner) mistook ordinary imbalance
        for slowness: at N=4 on 100 Mbit/s links two healthy owners out of four
        were judged slow and 44-69 % of the image was read twice.
        """
        held = [p.announced for p in self.peers.values() if not p.dead]
        held.append(self.have_count)
        median = statistics.median(held)
        fraction = median / self.chunk_count if self.chunk_count else 0.0
        progress = {r: p.owned_progress for r, p in self.peers.items() if not p.dead}
        progress[self.rank] = self.owned_progress
        slow = {
            r
            for r, done in progress.items()
            if done + self.config.slow_lag_chunks
            < self.config.slow_fraction * fraction * self._owned_total(r)
        }
        # A straggler: a node whose link is so slow that its whole progress
        # lags far behind. Its origin reads may keep pace (an origin stream
        # crowds out its peers), yet what it reads leaves through the same
        # thin uplink, and everyone waits for those chunks (a quarter-rate node
        # of 4 held the others at 3x their time). Judged on chunks held, as
        # announced, which every node sees alike, so they agree on it.
        announced = {r: p.announced for r, p in self.peers.items() if not p.dead}
        announced[self.rank] = self.have_count
        lagging = {
            r
            for r, count in announced.items()
            if count < self.config.straggler_fraction * median
            and median - count >= self.config.straggler_lag_chunks
        }
        # Only a lag that lasts: chunks complete in bursts, and a healthy node
        # can look far behind for a moment.
        self.lagging_since = {r: self.lagging_since.get(r, now) for r in lagging}
        slow |= {
            r
            for r, since in self.lagging_since.items()
            if now - since >= self.config.straggler_persist
        }
        if slow != self.slow:
            self.slow = slow
            self._reassign()

    def _owned_total(self, rank: int) -> int:
        """How many chunks rank ``rank`` owns (reads from the origin)."""
        return len(self.owned(rank))

    def _reassign(self) -> None:
        """Take over the unread chunks of dead or slow owners that fall to us."""
        gone = {r for r, p in self.peers.items() if p.dead or p.banned} | self.slow
        if self.rank in self.slow:
            # We are the slow one: leave our unread chunks to the backup owner.
            self.origin_queue = [i for i in self.origin_queue if self.backup_owner(i) == self.rank]
            heapq.heapify(self.origin_queue)
        queued = set(self.origin_queue)
        usable = [p for p in self.peers.values() if p.usable]
        for owner in gone - {self.rank}:
            for index in self.owned(owner):
                # Take over what no usable peer holds: what a dead or banned
                # owner announced is out of reach, and what only slow peers
                # hold would reach everyone through their slow uplinks.
                offered = any(p.bits[index] for p in usable if p.rank not in self.slow)
                if (
                    not self.have[index]
                    and not offered
                    and index not in self.inflight
                    and index not in queued
                    and self.backup_owner(index) == self.rank
                ):
                    heapq.heappush(self.origin_queue, index)
                    queued.add(index)
                    self.taken_over.add(owner)

    def _stall_fallback(self, now: float) -> None:
        """Nothing arrived for a while: read one unobtainable chunk ourselves."""
        if max(self.last_arrival, self.stall_checked) + self.config.stall_timeout > now:
            return  # written as in next_deadline(), so that deadline always fires
        # Whatever happens below, look again only a stall period from now:
        # a slow transfer is not a stall, and must not make us spin.
        self.stall_checked = now
        if self.origin_inflight or self.origin_queue:
            return
        usable = [p for p in self.peers.values() if p.usable]
        if any(self._has_offer(p) for p in usable):
            # Not a stall: peers hold chunks we need and are busy serving
            # others. Over a partial view this is the common case at start-up
            # (thousands of nodes wait for the first chunks to fan out), and
            # reading a chunk its owner has not reached yet would double it.
            return
        if len(self.peers) < self.size - 1 and not any(p.announced for p in usable):
            # Over a partial view, silence from every neighbour means the
            # broadcast has not reached our corner yet: hundreds of nodes
            # would read from the origin at once. Dead owners are replaced
            # by their ring successors (_reassign), which see them.
            return
        for index in range(self.chunk_count):
            if self.have[index] or index in self.inflight:
                continue
            if not any(p.bits[index] for p in usable):
                heapq.heappush(self.origin_queue, index)
                return

    def _origin_due(self, index: int) -> bool:
        """Read this chunk from the origin now, or leave the link to peers?

        Chunks taken over from others are read at once. Our own are paced:
        a flow from an origin faster than our link crowds out the peers' flows
        (measured on 100 Mbit/s links with a 1 Gbit/s origin: one origin
        stream took ~60 % of the downlink), which leaves uplinks idle early and
        short later. So we read ahead of the swarm's pace only by
        ``origin_lead`` chunks, unless the peers cannot fill our window.
        """
        if self.owner(index) != self.rank:
            return True
        if self._peer_inflight() < self.config.total_window:
            return True  # the link would idle otherwise
        quota = self._owned_total(self.rank) * self.have_count / max(self.chunk_count, 1)
        return self.owned_progress + self.origin_inflight < quota + self.config.origin_lead

    def _schedule_origin(self, now: float, actions: list[Action]) -> None:
        # One read in flight for our own chunks, one more for each owner whose
        # chunks we took over: the backup of a straggler must read twice the
        # share, and with one stream it fell far behind (simulated N=4, a
        # quarter-rate node: the others at 1.5x their fault-free time).
        window = self.config.origin_window + len(self.taken_over)
        waiting: list[int] = []  # own chunks not due yet: later, in order
        while self.origin_queue and self.origin_inflight < window:
            index = heapq.heappop(self.origin_queue)
            if self.have[index] or index in self.inflight:
                continue
            if self.rank in self.slow and self.backup_owner(index) != self.rank:
                continue
            if not self._origin_due(index):
                waiting.append(index)
                continue
            self.inflight[index] = (ORIGIN, now)
            self.origin_inflight += 1
            actions.append(ReadOrigin(index))
        for index in waiting:
            heapq.heappush(self.origin_queue, index)

    def _next_offer(self, peer: _Peer) -> int | None:
        """The rarest chunk this peer offers (lowest index among equals).

        Rarest first spreads the load over uplinks: a chunk few peers hold is
        the one most likely to become a bottleneck later.
        """
        best: int | None = None
        best_key = (0, 0)
        offset = self.tie_offset if self.slow else 0
        stale = []
        for index in peer.offers:
            if self.have[index] or not peer.bits[index]:
                stale.append(index)
                continue
            if index in self.inflight:
                continue
            if index in peer.timed_out and any(
                p is not peer and p.usable and p.bits[index] for p in self.peers.values()
            ):
                continue  # it let us down on this one; another holder exists
            key = (self.holders[index], (index - offset) % self.chunk_count)
            if best is None or key < best_key:
                best, best_key = index, key
        peer.offers.difference_update(stale)
        return best

    def _has_offer(self, peer: _Peer) -> bool:
        """Whether _next_offer(peer) is not None, without ranking every offer:
        asked of every neighbour at every poll, it must not cost O(offers)."""
        stale = []
        found = False
        for index in peer.offers:
            if self.have[index] or not peer.bits[index]:
                stale.append(index)
            elif index not in self.inflight and (
                index not in peer.timed_out
                or not any(
                    p is not peer and p.usable and p.bits[index] for p in self.peers.values()
                )
            ):
                found = True
                break
        peer.offers.difference_update(stale)
        return found

    def _request(self, peer: _Peer, now: float, actions: list[Action]) -> bool:
        index = self._next_offer(peer)
        if index is None:
            return False
        peer.offers.discard(index)
        self.inflight[index] = (peer.rank, now)
        peer.inflight[index] = now
        actions.append(RequestChunk(peer.rank, index))
        self.requests_sent += 1
        return True

    def _peer_inflight(self) -> int:
        return len(self.inflight) - self.origin_inflight

    def _schedule_peers(self, now: float, actions: list[Action]) -> None:
        cfg = self.config
        preferred_rank = self.preferred()
        if preferred_rank is not None:
            preferred = self.peers[preferred_rank]
            # A "busy" answer holds back the preferred peer too. Our ring
            # predecessor never answers busy (we are its successor), but a
            # preferred peer further back may, and the node also reports a
            # request it cannot send yet as busy (a cancelled request for the
            # chunk is still unanswered on the link): asked again at once,
            # that request would fail again at once, forever.
            while (
                preferred.usable
                and preferred.busy_until <= now
                and len(preferred.inflight) < cfg.peer_window
                and self._peer_inflight() < cfg.total_window
                and self._request(preferred, now, actions)
            ):
                pass
        while self._peer_inflight() < cfg.total_window:
            open_peers = [
                p
                for p in self.peers.values()
                if p.usable
                and len(p.inflight) < cfg.peer_window
                and p.busy_until <= now
                and self._has_offer(p)
            ]
            candidates = [p for p in open_peers if p.rank not in self.slow]
            if not candidates:
                # Slow peers only as a last resort, one request at a time:
                # their chunks crawl and hold window slots all the while
                # (simulated N=8 with a quarter-rate node: its successor's
                # successor drew a tenth of the image from it, and finished last).
                slow_busy = any(self.peers[r].inflight for r in self.slow if r in self.peers)
                if slow_busy or not open_peers:
                    return
                candidates = open_peers
            # Prefer holders we have no request with (spreads load over
            # uplinks), then the fastest measured, then chance.
            least = min(len(p.inflight) for p in candidates)
            candidates = [p for p in candidates if len(p.inflight) == least]
            # Unmeasured peers count as fast, so that every holder gets tried.
            rates = [p.rate or cfg.initial_rate for p in candidates]
            best = max(rates)
            fast = [p for p, r in zip(candidates, rates, strict=True) if r >= 0.5 * best]
            self._request(self.rng.choice(fast), now, actions)

    def successor(self) -> int:
        """The rank this node serves first (its ring successor)."""
        return (self.rank + 1) % self.size

    def accept_request(self, downstream: int, serving: Iterable[int]) -> bool:
        """Upstream side: serve ``downstream`` now, or answer busy?

        ``serving`` are the downstreams with chunks queued or being sent. The
        ring successor is always served: it counts on us. Others get
        ``serve_slots`` slots, first come first served, plus ``starter_slots``
        for neighbours that have announced fewer than ``starter_chunks``
        chunks (we know their holdings: views are symmetric, so a downstream
        in our view announces to us). A node that holds nothing has an idle
        uplink; its first chunk makes it a server, so the swarm's upload
        capacity grows fastest when such nodes are not left waiting behind
        nodes that already hold chunks. In the simulator (1 GiB, 100 Mbit/s)
        this cut last/floor from 1.315 to 1.218 at 1024 nodes (no change up
        to 64); reserving slots for them by turning others away (1.252),
        counting nodes with up to 2 or 4 chunks as starters (1.255, 1.237) and
        two starter slots (1.222) did worse.

        A slow downstream takes a slot's worth of time but little of our
        uplink, so it does not count against the slots (simulated N=8, a
        quarter-rate node held slots on three uplinks at once and starved a
        healthy node).
        """
        current = set(serving)
        if downstream in current or downstream == self.successor():
            return True
        current.discard(self.successor())
        current -= self.slow
        slots = self.config.serve_slots
        peer = self.peers.get(downstream)
        if peer is not None and peer.announced < self.config.starter_chunks:
            slots += self.config.starter_slots
        return len(current) < slots
