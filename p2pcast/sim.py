"""An in-memory cluster with a fake clock that drives the real swarm scheduler.

Used by the tests (many nodes in one process, no sockets, no sleeps) and by the
discrete-event benchmark (bench/sim_bench.py, up to thousands of nodes). The
network model is deliberately simple:

* Each node has an uplink and a downlink capacity (bytes/s); the origin has an
  uplink capacity. Every transfer carries ``goodput`` of the capacity it gets
  as payload: TCP/IP headers cost ~4.5 % on the emulated cluster's
  htb-shaped links (measured goodput 0.955 of the shaped rate).
* Rates are *local*: a transfer runs at the smaller of its sender's uplink
  share and its receiver's downlink share, each capacity split equally among
  the transfers using it. A flow starting or ending changes only the shares
  of its two endpoints, so only the flows through those two links are
  re-rated: O(flows per node) per event instead of a global max-min
  recomputation over every flow. The price: capacity that a flow cannot use
  (its other end is the bottleneck) is not handed to the link's other flows,
  so rates are a lower bound on max-min fair ones. ``exact_rates=True`` keeps
  the global max-min model (progressive filling) for comparison; the tests
  check that both agree within a few % on small clusters.
* Control messages (announcements, requests, cancels) arrive after a fixed
  one-way latency and take no bandwidth.
* An upstream serves one chunk at a time per downstream, in request order, as
  the daemon does (one writer per connection).
* Requests follow the wire protocol's rule: each gets exactly one answer, and
  a downstream does not ask an upstream for a chunk again while a request for
  it is unanswered (a Cancel does not end it), as the daemon does.
* Nodes talk only to their overlay neighbours (p2pcast.overlay): at most
  DEGREE of them, every other node in small clusters.

Faults: a node can be killed at a time or at a progress (its transfers stop,
its neighbours notice the link drop at once and declare it dead after
``dead_after``), and any node's capacities can be scaled (a straggler).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable

from p2pcast import overlay
from p2pcast.swarm import (
    ORIGIN,
    Abort,
    Action,
    CancelRequest,
    Finished,
    ReadOrigin,
    RequestChunk,
    Swarm,
    SwarmConfig,
)

#: Payload carried per byte of link capacity: TCP/IP headers cost the rest.
#: Measured on the emulated cluster (Linux namespaces, htb-shaped links): bulk
#: TCP transfers reach 0.955 of the shaped rate.
TCP_GOODPUT = 0.955


@dataclasses.dataclass(frozen=True, slots=True)
class SimSpec:
    nodes: int
    image_size: int
    chunk_size: int
    link_rate: float  # bytes/s, each direction, every node
    origin_rate: float  # bytes/s, the origin's uplink
    latency: float = 0.0002  # s, one way
    dead_after: float = 1.0  # s between a link drop and declaring the peer dead
    seed: int = 1
    config: SwarmConfig = dataclasses.field(default_factory=SwarmConfig)
    #: payload per byte of capacity, on every link and the origin's
    goodput: float = TCP_GOODPUT
    #: global max-min fair rates (slow; the reference for the local model)
    exact_rates: bool = False

    @property
    def floor(self) -> float:
        """S/B: the nominal link rate, headers not deducted."""
        return self.image_size / self.link_rate


@dataclasses.dataclass(slots=True)
class _Flow:
    src: int  # ORIGIN or a rank
    dst: int
    index: int
    remaining: float
    rate: float = 0.0
    updated: float = 0.0
    version: int = 0


@dataclasses.dataclass
class SimResult:
    finish_times: dict[int, float]
    origin_bytes: int
    killed: set[int]
    spec: SimSpec
    aborted: dict[int, str]
    events: int = 0  # discrete events processed

    @property
    def last(self) -> float:
        return max(self.finish_times.values())

    @property
    def ratio(self) -> float:
        return self.last / self.spec.floor


class SimCluster:
    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.now = 0.0
        sizes = [
            min(spec.chunk_size, spec.image_size - i)
            for i in range(0, spec.image_size, spec.chunk_size)
        ]
        self.chunk_sizes = sizes
        n = spec.nodes
        self.views = [overlay.neighbours(r, n) for r in range(n)]
        rng = random.Random(spec.seed)
        self.swarms = [
            Swarm(
                chunk_sizes=sizes,
                rank=r,
                size=n,
                now=0.0,
                rng=random.Random(rng.random()),
                config=spec.config,
                view=self.views[r],
            )
            for r in range(n)
        ]
        self.up_cap = [spec.link_rate * spec.goodput] * n
        self.down_cap = [spec.link_rate * spec.goodput] * n
        self.origin_cap = spec.origin_rate * spec.goodput
        self.up_flows: list[set[int]] = [set() for _ in range(n)]
        self.down_flows: list[set[int]] = [set() for _ in range(n)]
        self.origin_flows: set[int] = set()
        self.flows: dict[int, _Flow] = {}
        self.flow_ids = itertools.count()
        #: per upstream: downstream -> requested indexes not yet being sent
        self.queues: list[dict[int, deque[int]]] = [{} for _ in range(n)]
        #: per upstream: the downstreams it is sending a chunk to now
        self.sending: list[set[int]] = [set() for _ in range(n)]
        #: per downstream: (upstream, index) of its requests not answered yet,
        #: cancelled or not: what its PeerConnections call pending
        self.pending: list[set[tuple[int, int]]] = [set() for _ in range(n)]
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.event_count = 0
        self.alive = [True] * n
        self.alive_count = n  # sum(alive), kept: the main loop checks it per event
        self.finish_times: dict[int, float] = {}
        self.aborted: dict[int, str] = {}
        self.origin_bytes = 0
        self.timers: dict[int, float] = {}
        self.kill_progress: tuple[int, float] | None = None

    # ---- scenario knobs ---------------------------------------------------

    def scale_node(self, rank: int, factor: float) -> None:
        self.up_cap[rank] *= factor
        self.down_cap[rank] *= factor

    def kill_at(self, rank: int, when: float) -> None:
        self._at(when, lambda: self._kill(rank))

    def kill_at_progress(self, rank: int, fraction: float) -> None:
        """Kill ``rank`` when it holds ``fraction`` of the chunks."""
        self.kill_progress = (rank, fraction)

    # ---- main loop --------------------------------------------------------

    def run(self, until: float = 1e6) -> SimResult:
        for rank in range(self.spec.nodes):
            for peer in self.views[rank]:
                self.swarms[rank].peer_up(peer, 0.0)
            self._step(rank)
        events = self.events
        while events and self.now < until:
            when, _, fn = heapq.heappop(events)
            self.event_count += 1
            self.now = max(self.now, when)
            fn()
            if len(self.finish_times) + len(self.aborted) >= self.alive_count:
                break
        return SimResult(
            finish_times=dict(self.finish_times),
            origin_bytes=self.origin_bytes,
            killed={r for r, a in enumerate(self.alive) if not a},
            spec=self.spec,
            aborted=dict(self.aborted),
            events=self.event_count,
        )

    def _later(self, delay: float, fn: Callable[..., None], *args: int) -> None:
        self._at(self.now + delay, functools.partial(fn, *args))

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.seq), fn))

    def _step(self, rank: int) -> None:
        """Let one node's scheduler act, and arm its timer."""
        if not self.alive[rank]:
            return
        swarm = self.swarms[rank]
        for action in swarm.poll(self.now):
            self._act(rank, action)
        deadline = swarm.next_deadline()
        if deadline is not None and self.timers.get(rank) != deadline:
            self.timers[rank] = deadline
            self._at(max(deadline, self.now), functools.partial(self._timer, rank, deadline))

    def _timer(self, rank: int, deadline: float) -> None:
        if self.timers.get(rank) == deadline:
            del self.timers[rank]
            self._step(rank)

    def _act(self, rank: int, action: Action) -> None:
        lat = self.spec.latency
        match action:
            case RequestChunk(peer, index):
                if (peer, index) in self.pending[rank]:
                    # As Broadcast._act: a cancelled request for the chunk is
                    # still unanswered on that link, so the swarm hears "busy"
                    # at once, and polls again (a wakeup in the daemon).
                    self.swarms[rank].chunk_failed(index, peer, self.now, corrupt=False, busy=True)
                    self._later(0.0, self._step, rank)
                    return
                self.pending[rank].add((peer, index))
                self._later(lat, self._request_arrives, peer, rank, index)
            case ReadOrigin(index):
                self._later(2 * lat, self._start_flow, ORIGIN, rank, index)
            case CancelRequest(peer, index):
                # As the daemon: only a request still unanswered is cancelled.
                # (The swarm cannot cancel one request twice here: it cannot
                # ask for the chunk again on the link until the answer came.)
                if (peer, index) in self.pending[rank]:
                    self._later(lat, self._cancel_arrives, peer, rank, index)
            case Finished():
                self.finish_times[rank] = self.now
            case Abort(reason):
                self.aborted[rank] = reason

    # ---- requests and transfers -------------------------------------------

    def _request_arrives(self, src: int, dst: int, index: int) -> None:
        if not self.alive[src]:
            return
        if not self.swarms[src].have[index]:
            self._later(self.spec.latency, self._rejected, dst, src, index, 0)
            return
        queues = self.queues[src]
        serving = [d for d, q in queues.items() if q]
        serving += self.sending[src]
        if not self.swarms[src].accept_request(dst, serving):
            self._later(self.spec.latency, self._rejected, dst, src, index, 1)
            return
        queues.setdefault(dst, deque()).append(index)
        self._pump(src, dst)

    def _rejected(self, dst: int, src: int, index: int, busy: int) -> None:
        self.pending[dst].discard((src, index))
        if self.alive[dst]:
            self.swarms[dst].chunk_failed(index, src, self.now, corrupt=False, busy=bool(busy))
            self._step(dst)

    def _cancel_arrives(self, src: int, dst: int, index: int) -> None:
        queue = self.queues[src].get(dst)
        if queue and index in queue:
            # Still queued: dropped and answered with a "cancelled" Reject, as
            # the daemon does. Being sent (or sent): the chunk is the answer.
            queue.remove(index)
            self._later(self.spec.latency, self._cancel_answered, dst, src, index)

    def _cancel_answered(self, dst: int, src: int, index: int) -> None:
        """The "cancelled" Reject arrives: the request is answered. The swarm
        gave it up when it cancelled it, so it is not told (as in the daemon),
        and nothing changed that it would act on: no poll."""
        self.pending[dst].discard((src, index))

    def _pump(self, src: int, dst: int) -> None:
        queue = self.queues[src].get(dst)
        if dst in self.sending[src] or not queue:
            return
        self.sending[src].add(dst)
        index = queue.popleft()
        # The chunk's header answers the request; flows start at both ends at
        # once in this model, so the downstream has its answer now.
        self.pending[dst].discard((src, index))
        self._start_flow(src, dst, index)

    def _start_flow(self, src: int, dst: int, index: int) -> None:
        if not self.alive[dst] or (src != ORIGIN and not self.alive[src]):
            return
        fid = next(self.flow_ids)
        size = self.chunk_sizes[index]
        self.flows[fid] = _Flow(src, dst, index, float(size), updated=self.now)
        if src == ORIGIN:
            self.origin_bytes += size
            self.origin_flows.add(fid)
        else:
            self.up_flows[src].add(fid)
        self.down_flows[dst].add(fid)
        self._rerate(src, dst)

    def _rerate(self, src: int, dst: int) -> None:
        """New rates after a flow through ``src``'s uplink and ``dst``'s downlink
        started or ended."""
        if self.spec.exact_rates:
            self._rerate_exact()
            return
        # Only the shares of these two links changed, so only the flows that
        # cross one of them can change rate (see the module docstring).
        touched = self.origin_flows if src == ORIGIN else self.up_flows[src]
        for fid in touched | self.down_flows[dst]:
            self._set_rate(fid, self.flows[fid], self._local_rate(self.flows[fid]))

    def _local_rate(self, flow: _Flow) -> float:
        if flow.src == ORIGIN:
            up = self.origin_cap / len(self.origin_flows)
        else:
            up = self.up_cap[flow.src] / len(self.up_flows[flow.src])
        return min(up, self.down_cap[flow.dst] / len(self.down_flows[flow.dst]))

    def _set_rate(self, fid: int, flow: _Flow, rate: float) -> None:
        if rate == flow.rate:
            return
        flow.remaining -= flow.rate * (self.now - flow.updated)
        flow.updated = self.now
        flow.rate = rate
        flow.version += 1
        finish = self.now + max(flow.remaining, 0.0) / rate
        self._at(finish, functools.partial(self._flow_done, fid, flow.version))

    def _capacity(self, resource: tuple[str, int]) -> float:
        kind, rank = resource
        if kind == "o":
            return self.origin_cap
        return self.up_cap[rank] if kind == "u" else self.down_cap[rank]

    def _rerate_exact(self) -> None:
        """Max-min fair rates for all flows (progressive filling with a heap).

        Every flow crosses two resources: its sender's uplink (or the origin's)
        and its receiver's downlink. The most constrained resource fixes the
        rate of its flows first; what they leave unused goes to the others.
        O(all flows) per event: the reference model, for small clusters.
        """
        users: dict[tuple[str, int], list[int]] = {}
        for fid, flow in self.flows.items():
            up = ("o", 0) if flow.src == ORIGIN else ("u", flow.src)
            users.setdefault(up, []).append(fid)
            users.setdefault(("d", flow.dst), []).append(fid)
        left = {res: self._capacity(res) for res in users}
        count = {res: len(fids) for res, fids in users.items()}
        stamp = dict.fromkeys(users, 0)
        heap = [(left[res] / count[res], 0, res) for res in users]
        heapq.heapify(heap)
        rates: dict[int, float] = {}
        while heap:
            share, version, res = heapq.heappop(heap)
            if count[res] == 0 or version != stamp[res]:
                continue  # stale entry
            for fid in users[res]:
                if fid in rates:
                    continue
                rates[fid] = share
                flow = self.flows[fid]
                for other in (("o", 0) if flow.src == ORIGIN else ("u", flow.src), ("d", flow.dst)):
                    left[other] -= share
                    count[other] -= 1
                    if other != res and count[other]:
                        stamp[other] += 1
                        share_left = max(left[other], 0.0) / count[other]
                        heapq.heappush(heap, (share_left, stamp[other], other))
            count[res] = 0
        for fid, flow in self.flows.items():
            self._set_rate(fid, flow, rates[fid])

    def _flow_done(self, fid: int, version: int) -> None:
        flow = self.flows.get(fid)
        if flow is None or flow.version != version:
            return
        self._remove_flow(fid, flow)
        if flow.src != ORIGIN:
            self._pump(flow.src, flow.dst)
        self._deliver(flow.dst, flow.src, flow.index)

    def _remove_flow(self, fid: int, flow: _Flow) -> None:
        del self.flows[fid]
        self.down_flows[flow.dst].discard(fid)
        if flow.src == ORIGIN:
            self.origin_flows.discard(fid)
        else:
            self.up_flows[flow.src].discard(fid)
            self.sending[flow.src].discard(flow.dst)
        self._rerate(flow.src, flow.dst)

    def _deliver(self, rank: int, src: int, index: int) -> None:
        swarm = self.swarms[rank]
        fresh = not swarm.have[index]
        swarm.chunk_received(index, src, self.now)
        if fresh:
            # One event tells every neighbour: they all hear after one latency.
            self._later(self.spec.latency, self._announce, rank, index)
            kill = self.kill_progress
            if kill and kill[0] == rank and swarm.have_count >= kill[1] * swarm.chunk_count:
                self.kill_progress = None
                self._kill(rank)
                return
        self._step(rank)

    def _announce(self, src: int, index: int) -> None:
        if not self.alive[src]:
            return  # died before the announcement went out
        cfg = self.spec.config
        now = self.now
        for rank in self.views[src]:
            if not self.alive[rank]:
                continue
            swarm = self.swarms[rank]
            swarm.have_announced(src, index, now)
            # The news can only lead to asking ``src`` for ``index``: every
            # other option was weighed at the node's last poll, and whatever
            # changes them (an arrival, an answer, a timer) polls it anyway.
            # So poll only if that request is possible; skipping the other
            # polls is what keeps thousands of nodes fast.
            peer = swarm.peers[src]
            if (
                swarm.have[index]
                or index in swarm.inflight
                or len(swarm.inflight) - swarm.origin_inflight >= cfg.total_window
                or not peer.usable
                or len(peer.inflight) >= cfg.peer_window
                or peer.busy_until > now
            ):
                continue
            self._step(rank)

    # ---- faults -----------------------------------------------------------

    def _kill(self, rank: int) -> None:
        if not self.alive[rank]:
            return
        self.alive[rank] = False
        self.alive_count -= 1
        for fid, flow in list(self.flows.items()):
            if rank in (flow.src, flow.dst) and fid in self.flows:
                self._remove_flow(fid, flow)
        self.queues[rank].clear()
        for peer in self.views[rank]:
            self.queues[peer].pop(rank, None)
            if self.alive[peer]:
                self._later(self.spec.latency, self._lost, peer, rank)
                self._later(self.spec.dead_after, self._dead, peer, rank)

    def _lost(self, rank: int, peer: int) -> None:
        # The link is gone, and with it its requests (a new link starts afresh).
        self.pending[rank] = {(src, i) for src, i in self.pending[rank] if src != peer}
        if self.alive[rank]:
            self.swarms[rank].peer_down(peer, self.now)
            self._step(rank)

    def _dead(self, rank: int, peer: int) -> None:
        if self.alive[rank]:
            self.swarms[rank].peer_dead(peer, self.now)
            self._step(rank)


def simulate(spec: SimSpec, setup: Callable[[SimCluster], None] | None = None) -> SimResult:
    cluster = SimCluster(spec)
    if setup is not None:
        setup(cluster)
    return cluster.run()
