"""The swarm scheduler, driven by hand: events in, actions out, time as a number.

No sockets, files or clocks: every test builds a :class:`Swarm`, feeds it
events with an explicit ``now`` and looks at what :meth:`Swarm.poll` returns.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

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

MiB = 1024 * 1024

#: Config that keeps the judge and the stall fallback out of the way, for
#: tests about something else (both run on timers of their own).
QUIET: dict[str, Any] = {"takeover_grace": 1e6, "stall_timeout": 1e6}


def make(
    *,
    chunks: int = 8,
    size: int = 2,
    rank: int = 0,
    have: Iterable[int] = (),
    now: float = 0.0,
    seed: int = 0,
    **config: Any,
) -> Swarm:
    return Swarm(
        chunk_sizes=[MiB] * chunks,
        rank=rank,
        size=size,
        now=now,
        rng=random.Random(seed),
        config=SwarmConfig(**config),
        have=have,
    )


def own(chunks: int, size: int, rank: int) -> list[int]:
    return list(range(rank, chunks, size))


def all_up(swarm: Swarm, now: float = 0.0) -> None:
    for rank in swarm.peers:
        swarm.peer_up(rank, now)


def requests(actions: list[Action]) -> list[RequestChunk]:
    return [a for a in actions if isinstance(a, RequestChunk)]


def origin_reads(actions: list[Action]) -> list[int]:
    return [a.index for a in actions if isinstance(a, ReadOrigin)]


def exchange(swarms: list[Swarm], *, step: float = 0.01, rounds: int = 10_000) -> list[list[int]]:
    """Run swarms with instant, faultless delivery; return each rank's origin reads."""
    now = 0.0
    for swarm in swarms:
        all_up(swarm, now)
    reads: list[list[int]] = [[] for _ in swarms]
    finished: Counter[int] = Counter()

    def arrive(swarm: Swarm, index: int, source: int) -> None:
        swarm.chunk_received(index, source, now)
        for other in swarms:
            if other is not swarm:
                other.have_announced(swarm.rank, index, now)

    for _ in range(rounds):
        now += step
        for swarm in swarms:
            for action in swarm.poll(now):
                match action:
                    case ReadOrigin(index):
                        reads[swarm.rank].append(index)
                        arrive(swarm, index, ORIGIN)
                    case RequestChunk(peer, index):
                        assert swarms[peer].have[index], "asked a peer for a chunk it lacks"
                        arrive(swarm, index, peer)
                    case Finished():
                        finished[swarm.rank] += 1
                    case _:
                        pytest.fail(f"unexpected action in a fault-free run: {action}")
        if len(finished) == len(swarms):
            break
    else:
        pytest.fail(f"exchange did not finish: {finished}")
    # A few more polls: Finished must not come again.
    for swarm in swarms:
        assert swarm.poll(now + 1.0) == []
    assert all(count == 1 for count in finished.values())
    return reads


# ---- construction -------------------------------------------------------------


@pytest.mark.parametrize(("rank", "size"), [(-1, 3), (3, 3), (7, 3), (0, 0)])
def test_rank_outside_size_is_refused(rank: int, size: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        make(rank=rank, size=size)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_owner_is_index_mod_size(size: int) -> None:
    swarm = make(chunks=23, size=size, rank=size - 1)
    assert [swarm.owner(i) for i in range(23)] == [i % size for i in range(23)]


# ---- origin reads ---------------------------------------------------------------


def test_two_node_exchange_reads_each_chunk_from_origin_once_by_its_owner() -> None:
    chunks = 13
    swarms = [make(chunks=chunks, size=2, rank=r, seed=r) for r in range(2)]
    reads = exchange(swarms)
    assert sorted(reads[0] + reads[1]) == list(range(chunks))
    for rank, indexes in enumerate(reads):
        assert indexes == own(chunks, 2, rank)
    for swarm in swarms:
        assert swarm.complete
        assert swarm.bytes_from_origin == len(reads[swarm.rank]) * MiB
        assert swarm.bytes_from_peers == (chunks - len(reads[swarm.rank])) * MiB


def test_five_node_exchange_reads_each_chunk_once() -> None:
    chunks, size = 31, 5
    swarms = [make(chunks=chunks, size=size, rank=r, seed=r) for r in range(size)]
    reads = exchange(swarms)
    assert Counter(i for indexes in reads for i in indexes) == Counter(range(chunks))
    assert [sorted(indexes) for indexes in reads] == [own(chunks, size, r) for r in range(size)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_poll_reads_own_chunks_up_to_origin_window(window: int) -> None:
    swarm = make(chunks=20, size=3, rank=1, origin_window=window, **QUIET)
    mine = own(20, 3, 1)  # 1, 4, 7, ...
    assert swarm.poll(0.0) == [ReadOrigin(i) for i in mine[:window]]
    assert swarm.poll(0.1) == []  # window full: nothing more until one lands
    swarm.chunk_received(mine[0], ORIGIN, 0.2)
    assert swarm.poll(0.2) == [ReadOrigin(mine[window])]


def test_only_own_chunks_are_read_from_origin_when_peers_are_healthy() -> None:
    swarm = make(chunks=12, size=3, rank=2, origin_window=100, **QUIET)
    all_up(swarm)
    assert origin_reads(swarm.poll(0.0)) == own(12, 3, 2)


@pytest.mark.parametrize("corrupt", [False, True])
def test_origin_failures_are_retried_then_abort(corrupt: bool) -> None:
    swarm = make(chunks=1, size=1, max_origin_failures=3, **QUIET)
    assert swarm.poll(0.0) == [ReadOrigin(0)]
    for attempt in (1, 2):
        swarm.chunk_failed(0, ORIGIN, float(attempt), corrupt=corrupt)
        assert swarm.poll(float(attempt)) == [ReadOrigin(0)], f"retry {attempt}"
    swarm.chunk_failed(0, ORIGIN, 3.0, corrupt=corrupt)
    actions = swarm.poll(3.0)
    assert len(actions) == 1 and isinstance(actions[0], Abort)
    abort = actions[0]
    assert abort.corrupt is corrupt
    assert "chunk 0" in abort.reason and "3 times" in abort.reason
    assert ("corrupt" in abort.reason) is corrupt
    # An aborted swarm keeps saying so and asks for no more timers.
    assert swarm.poll(4.0) == actions
    assert swarm.next_deadline() is None


# ---- peer requests ------------------------------------------------------------


def seeded_swarm(*, size: int = 5, rank: int = 2, chunks: int = 40, **config: Any) -> Swarm:
    """A swarm that has its own chunks, with every peer up and offering everything."""
    swarm = make(chunks=chunks, size=size, rank=rank, have=own(chunks, size, rank), **config)
    all_up(swarm)
    everything = range(chunks)
    for peer in swarm.peers:
        swarm.bitfield(peer, everything, 0.0)
    return swarm


def test_requests_go_to_ring_predecessor_first_within_windows() -> None:
    swarm = seeded_swarm(peer_window=2, total_window=4, **QUIET)
    asked = requests(swarm.poll(0.0))
    assert [a.peer for a in asked[:2]] == [1, 1]  # rank 2's predecessor is rank 1
    assert len(asked) == 4
    extra = [a.peer for a in asked[2:]]
    assert 1 not in extra and len(set(extra)) == 2  # spread over other uplinks
    assert len({a.index for a in asked}) == 4
    assert swarm.poll(0.1) == []  # both windows full


def test_ring_predecessor_of_rank_zero_wraps_around() -> None:
    swarm = seeded_swarm(size=4, rank=0, peer_window=3, total_window=3, **QUIET)
    assert {a.peer for a in requests(swarm.poll(0.0))} == {3}


def test_rarest_chunk_is_requested_first() -> None:
    swarm = make(chunks=3, size=3, rank=0, have=[0], peer_window=1, total_window=1, **QUIET)
    all_up(swarm)
    swarm.bitfield(2, [1, 2], 0.0)  # the predecessor has both
    swarm.have_announced(1, 1, 0.0)  # chunk 1 has two holders, chunk 2 one
    assert swarm.poll(0.0) == [RequestChunk(2, 2)]


def test_peer_that_is_not_up_is_not_asked() -> None:
    swarm = make(chunks=4, size=2, rank=0, have=[0, 2], **QUIET)
    swarm.bitfield(1, [1, 3], 0.0)
    assert swarm.poll(0.0) == []
    swarm.peer_up(1, 0.1)
    assert {a.index for a in requests(swarm.poll(0.1))} == {1, 3}


@pytest.mark.parametrize("seed", range(12))
def test_windows_hold_under_random_events(seed: int) -> None:
    """Random announcements, arrivals, rejections and link drops: the windows hold.

    The test keeps its own record of what the swarm asked for, from the
    actions alone, and checks the limits against that record after every
    poll. It also checks that next_deadline() is in the future, which is what
    keeps a driver from spinning.
    """
    rng = random.Random(seed)
    size, rank, chunks = 6, 3, 60
    peer_window, total_window, origin_window = 2, 5, 2
    swarm = make(
        chunks=chunks,
        size=size,
        rank=rank,
        seed=seed,
        peer_window=peer_window,
        total_window=total_window,
        origin_window=origin_window,
    )
    all_up(swarm)
    down: set[int] = set()
    asked: dict[int, int] = {}  # index -> peer, per the actions
    reading: set[int] = set()
    now = 0.0
    for _ in range(3000):
        now += rng.uniform(0.001, 0.1)
        roll = rng.random()
        peer = rng.choice(list(swarm.peers))
        if roll < 0.35:
            swarm.have_announced(peer, rng.randrange(chunks), now)
        elif roll < 0.65 and asked:
            index = rng.choice(list(asked))
            swarm.chunk_received(index, asked.pop(index), now)
        elif roll < 0.72 and asked:
            index = rng.choice(list(asked))
            swarm.chunk_failed(index, asked.pop(index), now, corrupt=False)
        elif roll < 0.75 and peer not in down:
            swarm.peer_down(peer, now)
            down.add(peer)
            asked = {i: p for i, p in asked.items() if p != peer}
        elif roll < 0.85 and down:
            back = rng.choice(sorted(down))
            down.discard(back)
            swarm.peer_up(back, now)
        elif reading:
            index = rng.choice(sorted(reading))
            reading.discard(index)
            swarm.chunk_received(index, ORIGIN, now)
        for action in swarm.poll(now):
            match action:
                case RequestChunk(to, index):
                    assert to not in down, "asked a peer whose link is down"
                    assert index not in asked and index not in reading
                    assert not swarm.have[index]
                    asked[index] = to
                case CancelRequest(to, index):
                    assert asked.pop(index) == to
                case ReadOrigin(index):
                    assert index not in asked and index not in reading
                    reading.add(index)
                case Finished():
                    assert swarm.complete
                case Abort():
                    pytest.fail(f"abort without origin failures: {action}")
        per_peer = Counter(asked.values())
        assert max(per_peer.values(), default=0) <= peer_window
        assert len(asked) <= total_window
        # one more stream per owner whose chunks this node reads in its place
        assert len(reading) <= origin_window + len(swarm.taken_over)
        assert len(swarm.taken_over) <= size - 1
        deadline = swarm.next_deadline()
        assert deadline is None or deadline > now, f"deadline {deadline} not after {now}"
        if swarm.complete:
            break
    assert swarm.complete, f"seed {seed}: {swarm.have_count}/{chunks} after {now:.1f} s"


def test_rejected_request_is_retried_elsewhere_and_clears_the_bit() -> None:
    swarm = make(chunks=3, size=3, rank=0, have=[0, 2], **QUIET)
    all_up(swarm)
    swarm.have_announced(1, 1, 0.0)
    swarm.have_announced(2, 1, 0.0)
    assert swarm.holders[1] == 2
    assert swarm.poll(0.0) == [RequestChunk(2, 1)]  # the predecessor first
    swarm.chunk_failed(1, 2, 0.1, corrupt=False)
    assert swarm.peers[2].bits[1] == 0
    assert swarm.holders[1] == 1
    assert not swarm.peers[2].banned  # a rejection is no offence
    assert swarm.poll(0.1) == [RequestChunk(1, 1)]
    # Peer 2 is not asked for chunk 1 again until it announces it again.
    swarm.chunk_failed(1, 1, 0.2, corrupt=False)
    assert swarm.poll(0.2) == []
    swarm.have_announced(2, 1, 0.3)
    assert swarm.poll(0.3) == [RequestChunk(2, 1)]


def test_corrupt_chunk_bans_the_peer_for_good() -> None:
    chunks = 12
    swarm = make(chunks=chunks, size=3, rank=0, have=own(chunks, 3, 0), **QUIET)
    all_up(swarm)
    for peer in (1, 2):
        swarm.bitfield(peer, range(chunks), 0.0)
    first = requests(swarm.poll(0.0))
    bad = next(a for a in first if a.peer == 2)
    swarm.chunk_failed(bad.index, 2, 0.1, corrupt=True)
    assert swarm.peers[2].banned
    assert not swarm.peers[2].inflight  # its other requests were dropped too
    assert swarm.preferred() == 1
    # Drive to the end; peer 2 keeps announcing and coming back, and is never asked.
    asked = {a.index: a.peer for a in first if a.peer == 1}
    now = 0.1
    while not swarm.complete:
        now += 0.01
        swarm.peer_up(2, now)
        swarm.have_announced(2, 0, now)
        for action in swarm.poll(now):
            assert not (isinstance(action, RequestChunk) and action.peer == 2), action
            if isinstance(action, RequestChunk):
                asked[action.index] = action.peer
        for index, peer in list(asked.items()):
            swarm.chunk_received(index, peer, now)
            del asked[index]
        assert now < 10.0, "did not finish from the honest peer"
    assert swarm.poll(now) == [Finished()]


def test_peer_down_returns_its_requests_to_the_pool() -> None:
    swarm = make(chunks=3, size=3, rank=0, have=[0], **QUIET)
    all_up(swarm)
    for peer in (1, 2):
        swarm.bitfield(peer, [1, 2], 0.0)
    assert {(a.peer, a.index) for a in requests(swarm.poll(0.0))} == {(2, 1), (2, 2)}
    swarm.peer_down(2, 0.5)
    assert swarm.inflight == {}
    assert {(a.peer, a.index) for a in requests(swarm.poll(0.5))} == {(1, 1), (1, 2)}
    # A link that comes back is usable again (not dead), once there is room.
    swarm.peer_down(1, 0.6)
    swarm.peer_up(2, 0.7)
    assert {(a.peer, a.index) for a in requests(swarm.poll(0.7))} == {(2, 1), (2, 2)}


def test_request_older_than_timeout_is_cancelled() -> None:
    # Unmeasured links: timeout = max(request_timeout_min, 8 chunk times at 100 MB/s).
    swarm = make(chunks=2, size=2, rank=0, have=[0], request_timeout_min=5.0, **QUIET)
    all_up(swarm)
    swarm.have_announced(1, 1, 0.0)
    assert swarm.poll(0.0) == [RequestChunk(1, 1)]
    assert swarm.next_deadline() == pytest.approx(5.0)
    assert swarm.poll(4.99) == []
    actions = swarm.poll(5.0)
    assert actions[0] == CancelRequest(1, 1)
    # The only holder is asked again, with a fresh deadline.
    assert actions[1:] == [RequestChunk(1, 1)]
    assert swarm.inflight[1] == (1, 5.0)
    deadline = swarm.next_deadline()
    assert deadline is not None and deadline > 5.0


def test_request_timeout_scales_with_measured_rate() -> None:
    swarm = make(chunks=4, size=2, rank=0, have=[0, 2], request_timeout_min=1.0, **QUIET)
    all_up(swarm)
    swarm.bitfield(1, [1, 3], 0.0)
    first = requests(swarm.poll(0.0))
    assert [a.index for a in first] == [1, 3]
    # Chunk 1 took 2 s: the link runs at 0.5 MiB/s, so 8 chunk times are 16 s,
    # well above the 1 s floor. Chunk 3 was asked at 0.0.
    swarm.chunk_received(1, 1, 2.0)
    assert swarm.poll(2.0) == []
    assert swarm.next_deadline() == pytest.approx(16.0)
    assert swarm.poll(15.99) == []
    assert CancelRequest(1, 3) in swarm.poll(16.0)


def test_timed_out_request_is_asked_elsewhere() -> None:
    # The module docstring: "A request unanswered past a deadline is cancelled
    # and asked elsewhere". With another holder up, it is asked of the same one.
    swarm = make(chunks=3, size=3, rank=0, have=[0, 2], **QUIET)
    all_up(swarm)
    swarm.bitfield(1, [1], 0.0)
    swarm.bitfield(2, [1], 0.0)
    assert swarm.poll(0.0) == [RequestChunk(2, 1)]
    actions = swarm.poll(5.0)
    assert actions == [CancelRequest(2, 1), RequestChunk(1, 1)]


def test_late_answer_to_cancelled_request_leaves_the_new_request_alone() -> None:
    swarm = make(chunks=3, size=3, rank=0, have=[0, 2], **QUIET)
    all_up(swarm)
    swarm.have_announced(1, 1, 0.0)
    assert swarm.poll(0.0) == [RequestChunk(1, 1)]
    swarm.have_announced(2, 1, 4.9)
    assert swarm.poll(5.0) == [CancelRequest(1, 1), RequestChunk(2, 1)]
    # Peer 1's reject crossed our cancel on the wire.
    swarm.chunk_failed(1, 1, 5.1, corrupt=False)
    assert swarm.inflight.get(1) == (2, 5.0)
    assert swarm.poll(5.2) == []  # no second request for chunk 1 while one is out


def test_busy_preferred_peer_is_left_alone_for_the_back_off() -> None:
    # The node reports a request it cannot send yet (a cancelled request for
    # the chunk is still unanswered on the link) as "busy". Asked again at
    # once, the ring predecessor would be refused again at once, forever (the
    # simulator looped at one instant; the daemon spun).
    swarm = make(chunks=2, size=2, rank=0, have=[0], **QUIET)
    all_up(swarm)
    swarm.have_announced(1, 1, 0.0)
    assert swarm.poll(0.0) == [RequestChunk(1, 1)]
    swarm.chunk_failed(1, 1, 0.1, corrupt=False, busy=True)
    assert swarm.poll(0.1) == []
    until = swarm.peers[1].busy_until
    assert until > 0.1
    assert swarm.next_deadline() == until
    assert swarm.poll(until) == [RequestChunk(1, 1)]


def test_busy_back_off_is_capped_when_rates_collapse() -> None:
    # Timeouts halve a peer's measured rate, and a peer with none gets 1 B/s:
    # "two chunk times" could then be days.
    swarm = make(chunks=2, size=2, rank=0, have=[0], **QUIET)
    all_up(swarm)
    swarm.have_announced(1, 1, 0.0)
    assert swarm.poll(0.0) == [RequestChunk(1, 1)]
    swarm.peers[1].rate = 1.0
    swarm._chunk_time = None  # as after a timeout's halving
    swarm.chunk_failed(1, 1, 0.1, corrupt=False, busy=True)
    assert swarm.peers[1].busy_until == 0.1 + swarm.config.busy_backoff_max
    assert swarm.poll(0.1 + swarm.config.busy_backoff_max) == [RequestChunk(1, 1)]


# ---- owners that die or lie ------------------------------------------------------


def test_dead_owner_chunks_are_spread_over_the_next_ranks() -> None:
    chunks, size, dead = 16, 4, 1
    swarms = {
        r: make(chunks=chunks, size=size, rank=r, have=own(chunks, size, r), origin_window=8)
        for r in range(size)
        if r != dead
    }
    taken: dict[int, list[int]] = {}
    for rank, swarm in swarms.items():
        all_up(swarm)
        # It read chunks 1 and 5 before it died; rank 0 already fetched 5.
        swarm.have_announced(dead, 1, 0.0)
        swarm.have_announced(dead, 5, 0.0)
        if rank != 0:
            swarm.have_announced(0, 5, 0.0)
        swarm.peer_dead(dead, 0.5)
        # Rank 1's chunks 1, 5, 9, 13 go round the next healthy ranks 2, 3, 0.
        assert [swarm.backup_owner(i) for i in (1, 5, 9, 13)] == [2, 3, 0, 2]
        taken[rank] = origin_reads(swarm.poll(0.5))
    # Chunk 1 died with its only holder: its backup reads it again; chunk 5
    # is still to be had from rank 0; each chunk is read by one node only.
    assert taken == {0: [9], 2: [1, 13], 3: []}


def test_backup_owner_skips_a_dead_backup() -> None:
    swarm = make(chunks=16, size=4, rank=3, have=own(16, 4, 3), origin_window=8)
    all_up(swarm)
    swarm.peer_dead(2, 0.0)
    # Rank 2's chunks go round ranks 3, 0, 1: rank 3 reads 2 and 14.
    assert origin_reads(swarm.poll(0.0)) == [2, 14]
    swarm.peer_dead(1, 0.1)
    # Now ranks 3 and 0 share both dead ranks' chunks; never a dead rank.
    backups = {i: swarm.backup_owner(i) for i in own(16, 4, 1) + own(16, 4, 2)}
    assert set(backups.values()) == {0, 3}
    mine = sorted(i for i, b in backups.items() if b == 3 and i not in (2, 14))
    assert origin_reads(swarm.poll(0.1)) == mine


def test_slow_owner_loses_its_chunks_to_the_backups() -> None:
    # Ranks 2 and 0 share rank 1's chunks. Rank 0 and rank 2 make progress on
    # their own chunks; rank 1 makes none, so it is judged slow after the grace.
    chunks = 30
    swarm = make(
        chunks=chunks, size=3, rank=2, have=own(chunks, 3, 2), origin_window=20, stall_timeout=1e6
    )
    all_up(swarm)
    swarm.bitfield(0, own(chunks, 3, 0), 0.0)
    swarm.poll(0.0)  # asks rank 0 for its chunks; they stay in flight
    assert origin_reads(swarm.poll(1.0)) == []  # still in the grace period
    assert origin_reads(swarm.poll(2.0)) == own(chunks, 3, 1)[::2]  # every other one
    assert swarm.slow == {1}


def test_banned_owner_chunks_are_taken_over_at_once() -> None:
    # Rank 1 announces its chunks, then serves garbage and is banned. Nobody
    # can get its chunks from it; the backup owner (us) should read them from
    # the origin now, not one per stall_timeout.
    swarm = make(chunks=6, size=2, rank=0, have=[0, 2, 4], origin_window=3)
    swarm.peer_up(1, 0.0)
    swarm.bitfield(1, [1, 3, 5], 0.0)
    first = requests(swarm.poll(0.0))
    swarm.chunk_failed(first[0].index, 1, 0.1, corrupt=True)
    assert origin_reads(swarm.poll(0.2)) == [1, 3, 5]


# ---- stall fallback, completion, deadlines -------------------------------------


def test_stall_fallback_reads_unobtainable_chunks_one_per_period() -> None:
    swarm = make(chunks=4, size=2, rank=0, have=[0, 2], stall_timeout=5.0, takeover_grace=1e6)
    all_up(swarm)  # rank 1 is up but announces nothing (and is not judged)
    assert swarm.poll(0.0) == []
    assert swarm.next_deadline() == pytest.approx(5.0)
    assert swarm.poll(4.9) == []
    assert swarm.poll(5.0) == [ReadOrigin(1)]
    assert swarm.poll(5.5) == []  # one at a time
    swarm.chunk_received(1, ORIGIN, 6.0)
    assert swarm.poll(10.9) == []
    assert swarm.poll(11.0) == [ReadOrigin(3)]
    swarm.chunk_received(3, ORIGIN, 11.5)
    assert swarm.poll(11.5) == [Finished()]


def test_stall_fallback_leaves_chunks_a_peer_offers() -> None:
    swarm = make(chunks=4, size=2, rank=0, have=[0, 2], stall_timeout=5.0, takeover_grace=1e6)
    all_up(swarm)
    swarm.bitfield(1, [1], 0.0)
    assert swarm.poll(0.0) == [RequestChunk(1, 1)]
    swarm.chunk_received(1, 1, 4.0)  # resets the stall clock
    assert origin_reads(swarm.poll(8.9)) == []
    assert origin_reads(swarm.poll(9.0)) == [3]  # 3 is offered by nobody


def test_own_origin_reads_are_paced_while_peers_fill_the_window() -> None:
    # Rank 0 of 4 owns 16 of 64 chunks. The others offer everything else, so
    # the peer window is full: rank 0 reads its own chunks only ``origin_lead``
    # ahead of its share of its progress, and leaves the rest of the link to peers.
    swarm = make(chunks=64, size=4, rank=0, origin_window=1, origin_lead=2, **QUIET)
    all_up(swarm)
    for peer in (1, 2, 3):
        swarm.bitfield(peer, [i for i in range(64) if i % 4], 0.0)
    first = swarm.poll(0.0)
    assert origin_reads(first) == [0] and len(requests(first)) == 4
    swarm.chunk_received(0, ORIGIN, 0.1)
    assert origin_reads(swarm.poll(0.1)) == [4]
    swarm.chunk_received(4, ORIGIN, 0.2)
    assert origin_reads(swarm.poll(0.2)) == [8]
    swarm.chunk_received(8, ORIGIN, 0.3)
    assert origin_reads(swarm.poll(0.3)) == []  # 3 read, quota 16 * 3/64 + 2
    for n, req in enumerate(requests(first)):
        swarm.chunk_received(req.index, req.peer, 0.4 + n / 100)
    assert 12 in origin_reads(swarm.poll(0.5))  # progress 7/64: quota 3.75


def test_own_origin_reads_go_on_when_peers_offer_nothing() -> None:
    swarm = make(chunks=64, size=4, rank=0, origin_window=1, origin_lead=0, **QUIET)
    all_up(swarm)
    for step, index in enumerate(range(0, 16, 4)):
        assert origin_reads(swarm.poll(step)) == [index]
        swarm.chunk_received(index, ORIGIN, step + 0.5)


def test_finished_is_emitted_exactly_once() -> None:
    swarm = make(chunks=2, size=1, origin_window=2, **QUIET)
    assert swarm.poll(0.0) == [ReadOrigin(0), ReadOrigin(1)]
    swarm.chunk_received(0, ORIGIN, 0.1)
    assert swarm.poll(0.1) == []
    swarm.chunk_received(1, ORIGIN, 0.2)
    swarm.chunk_received(1, ORIGIN, 0.2)  # a duplicate changes nothing
    assert swarm.have_count == 2
    assert swarm.poll(0.2) == [Finished()]
    assert swarm.poll(0.3) == []
    assert swarm.on_timer(0.4) == []
    assert swarm.next_deadline() is None


def test_swarm_with_everything_cached_finishes_at_once() -> None:
    swarm = make(chunks=5, size=3, rank=1, have=range(5))
    assert swarm.complete
    assert swarm.poll(0.0) == [Finished()]
    assert swarm.poll(1.0) == []
    assert swarm.bytes_from_origin == swarm.bytes_from_peers == 0


def test_next_deadline_is_after_every_poll_in_a_healthy_exchange() -> None:
    swarms = [make(chunks=9, size=3, rank=r, seed=r) for r in range(3)]
    for swarm in swarms:
        all_up(swarm)
    now = 0.0
    while not all(s.complete for s in swarms):
        now += 0.05
        assert now < 60.0
        for swarm in swarms:
            for action in swarm.poll(now):
                if isinstance(action, RequestChunk | ReadOrigin):
                    source = action.peer if isinstance(action, RequestChunk) else ORIGIN
                    swarm.chunk_received(action.index, source, now)
                    for other in swarms:
                        if other is not swarm:
                            other.have_announced(swarm.rank, action.index, now)
            deadline = swarm.next_deadline()
            assert deadline is None or deadline > now


@pytest.mark.parametrize("busy_with", ["slow origin read", "slow peer transfer"])
def test_next_deadline_is_not_in_the_past_while_waiting(busy_with: str) -> None:
    # Past stall_timeout with nothing new, but the stall fallback has nothing
    # to do (an origin read or a peer transfer is simply slow). A driver
    # sleeps until next_deadline(); one in the past makes it spin (the
    # simulator loops at one instant; the daemon polls with timeout 0).
    if busy_with == "slow origin read":
        swarm = make(chunks=2, size=2, rank=0, stall_timeout=5.0, takeover_grace=1e6)
        all_up(swarm)
        assert swarm.poll(0.0) == [ReadOrigin(0)]
    else:
        swarm = make(
            chunks=2,
            size=2,
            rank=0,
            have=[0],
            stall_timeout=5.0,
            request_timeout_min=30.0,
            takeover_grace=1e6,
        )
        all_up(swarm)
        swarm.have_announced(1, 1, 0.0)
        assert swarm.poll(0.0) == [RequestChunk(1, 1)]
    assert swarm.poll(6.0) == []
    deadline = swarm.next_deadline()
    assert deadline is not None and deadline > 6.0, f"next_deadline() = {deadline} at 6.0"


def test_a_request_deadline_always_fires() -> None:
    # 6.34317728 + 5.0 - 6.34317728 < 5.0 in floating point: the expiry test
    # must use the very sum next_deadline() returns, or the timer spins.
    swarm = make(chunks=4, size=2, rank=0, have=[0, 2], request_timeout_min=5.0, **QUIET)
    all_up(swarm)
    swarm.bitfield(1, [1], 6.34317728)
    assert swarm.poll(6.34317728) == [RequestChunk(1, 1)]
    deadline = swarm.next_deadline()
    assert deadline is not None
    assert CancelRequest(1, 1) in swarm.poll(deadline)


def test_accept_request_keeps_a_slot_for_neighbours_that_hold_nothing() -> None:
    # Rank 0 of 8 serves its successor (1) always, two others (serve_slots),
    # and one more (starter_slots) only if that one holds nothing yet: at
    # start-up, a holder's slots go to nodes that can then serve others.
    swarm = make(chunks=8, size=8, rank=0, have=range(8), serve_slots=2, starter_slots=1)
    all_up(swarm)
    for rank in (2, 3, 4):
        swarm.have_announced(rank, 0, 0.0)
    assert swarm.accept_request(1, [1, 2, 3, 4, 5])  # the successor
    assert swarm.accept_request(2, [2, 3])  # already being served
    assert swarm.accept_request(2, [1, 3])  # the successor takes no slot
    assert not swarm.accept_request(4, [2, 3])  # holds chunk 0: slots full
    assert swarm.accept_request(5, [2, 3])  # holds nothing: the starter slot
    assert not swarm.accept_request(6, [2, 3, 5])  # the starter slot is taken
    swarm.have_announced(5, 1, 0.0)
    assert not swarm.accept_request(5, [2, 3])  # now it holds a chunk
    assert swarm.accept_request(7, [2])  # a free slot serves anyone


def test_accept_request_without_starter_slots_is_first_come_first_served() -> None:
    swarm = make(chunks=8, size=8, rank=0, have=range(8), serve_slots=2, starter_slots=0)
    all_up(swarm)
    assert swarm.accept_request(5, [2])
    assert not swarm.accept_request(5, [2, 3])
    assert swarm.accept_request(1, [2, 3])  # the successor
