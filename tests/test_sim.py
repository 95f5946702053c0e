"""Many nodes in one process: the real scheduler on the simulator's fake clock.

All times here are simulated seconds from a deterministic discrete-event run,
so bounds on them are exact properties of the code, not of the machine that
runs the tests.
"""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from p2pcast import overlay
from p2pcast.sim import SimCluster, SimResult, SimSpec, simulate
from p2pcast.swarm import Action, RequestChunk, SwarmConfig

MiB = 1024 * 1024
CHUNK = 4 * MiB
LINK = 1.25e9  # 10 Gbit/s each way, every node

#: 64 nodes, 32 chunks; the last chunk is short, as most images' are.
BIG = SimSpec(
    nodes=64,
    image_size=32 * CHUNK - 12_345,
    chunk_size=CHUNK,
    link_rate=LINK,
    origin_rate=LINK,
    seed=7,
)


def chunk_count(spec: SimSpec) -> int:
    return -(-spec.image_size // spec.chunk_size)


def ring_floor(spec: SimSpec) -> float:
    """Simulated time a pipelined ring needs: stream C chunks, plus N-1 hops.

    With fewer chunks than nodes the hops dominate: the last chunk must still
    cross the ring (64 nodes, 32 chunks: ~3x the bandwidth floor S/B).
    """
    chunks = chunk_count(spec)
    return spec.floor * (chunks + spec.nodes - 1) / chunks


def assert_all_finished(result: SimResult, *, killed: frozenset[int] = frozenset()) -> None:
    assert result.aborted == {}
    assert result.killed == killed
    assert set(result.finish_times) == set(range(result.spec.nodes)) - killed


def test_64_nodes_all_finish_with_origin_read_once() -> None:
    big_run = simulate(BIG)
    assert_all_finished(big_run)
    size = BIG.image_size
    assert size <= big_run.origin_bytes <= 1.05 * size
    # Simulated time (deterministic): within 2x of what a pipelined ring
    # needs, itself ~3x the floor S/B at this node/chunk ratio.
    assert big_run.last < 2 * ring_floor(BIG), f"ratio {big_run.ratio:.2f}"
    assert big_run.last >= BIG.floor  # nothing beats the downlink


def test_same_seed_gives_the_same_run() -> None:
    # 16 nodes: the same code paths as 64, at a quarter of the run time.
    spec = dataclasses.replace(BIG, nodes=16)
    first, again = simulate(spec), simulate(spec)
    assert again.finish_times == first.finish_times
    assert again.origin_bytes == first.origin_bytes
    other = simulate(dataclasses.replace(spec, seed=spec.seed + 1))
    assert other.finish_times != first.finish_times  # the seed is really used


def test_node_killed_half_way_does_not_stop_the_others() -> None:
    result = simulate(BIG, lambda cluster: cluster.kill_at_progress(5, 0.5))
    assert_all_finished(result, killed=frozenset({5}))
    assert result.origin_bytes <= 1.10 * BIG.image_size
    # The survivors may wait dead_after (simulated) before taking over.
    assert result.last < 2 * ring_floor(BIG) + BIG.dead_after


def test_owner_killed_before_reading_is_replaced() -> None:
    spec = dataclasses.replace(BIG, nodes=16)
    cluster = SimCluster(spec)
    cluster.kill_at(3, 1e-6)  # before its first origin read completes
    result = cluster.run()
    assert_all_finished(result, killed=frozenset({3}))
    assert result.origin_bytes <= 1.10 * spec.image_size
    # Its two chunks (3, 19) were read by its backup owners, ranks 4 and 5.
    for backup in (4, 5):
        assert cluster.swarms[backup].bytes_from_origin > cluster.swarms[6].bytes_from_origin


def test_straggler_does_not_stop_the_swarm() -> None:
    result = simulate(BIG, lambda cluster: cluster.scale_node(7, 0.25))
    assert_all_finished(result)
    assert result.origin_bytes <= 1.05 * BIG.image_size
    # Simulated time. Its downlink runs at a quarter: it cannot finish
    # before 4 S/B; nobody should need much more than that.
    assert result.finish_times[7] >= 4 * BIG.floor
    assert result.last < 3 * ring_floor(BIG), f"ratio {result.ratio:.2f}"


def test_a_chunk_is_asked_again_of_a_holder_only_once_it_answered() -> None:
    # Requests time out after one chunk time (0.3 s at least) and a node at a
    # tenth of the rate is slow to answer, so the swarm often cancels and asks
    # the same holder again at once. As in the daemon, that request waits (as
    # a "busy" answer) until the cancelled one is answered: an upstream never
    # holds two requests for one chunk from one downstream.
    config = SwarmConfig(request_timeout_min=0.3, request_timeout_chunks=1.0)
    spec = SimSpec(
        nodes=3,
        image_size=32 * CHUNK,
        chunk_size=CHUNK,
        link_rate=12.5e6,
        origin_rate=125e6,
        config=config,
    )
    cluster = SimCluster(spec)
    cluster.scale_node(0, 0.1)
    refused = 0
    act, arrives = cluster._act, cluster._request_arrives

    def counting_act(rank: int, action: Action) -> None:
        nonlocal refused
        if (
            isinstance(action, RequestChunk)
            and (action.peer, action.index) in cluster.pending[rank]
        ):
            refused += 1
            # Before the swarm honoured a busy preferred peer, this looped at one instant.
            assert refused < 1000, "asked again and again at one instant"
        act(rank, action)

    def checked_arrival(src: int, dst: int, index: int) -> None:
        assert index not in cluster.queues[src].get(dst, ()), "a second request for a chunk"
        arrives(src, dst, index)

    cluster._act = counting_act  # type: ignore[method-assign]
    cluster._request_arrives = checked_arrival  # type: ignore[method-assign]
    result = cluster.run()
    assert_all_finished(result)
    assert refused > 0, "the case under test did not happen"


def test_two_nodes() -> None:
    spec = dataclasses.replace(BIG, nodes=2)
    cluster = SimCluster(spec)
    result = cluster.run()
    assert_all_finished(result)
    assert result.origin_bytes == spec.image_size
    assert result.ratio < 1.5
    # Each reads its half from the origin and gets the other half from its peer.
    for swarm in cluster.swarms:
        assert swarm.bytes_from_origin + swarm.bytes_from_peers == spec.image_size
        assert swarm.bytes_from_peers > 0


def test_one_node_reads_everything_from_origin() -> None:
    spec = dataclasses.replace(BIG, nodes=1)
    cluster = SimCluster(spec)
    result = cluster.run()
    assert_all_finished(result)
    assert result.origin_bytes == spec.image_size
    assert cluster.swarms[0].bytes_from_origin == spec.image_size
    assert cluster.swarms[0].bytes_from_peers == 0
    assert result.ratio < 1.2  # origin as fast as the link: just the latency on top


def test_slow_origin_is_waited_for() -> None:
    # Slow but not stalling: the origin's 4 MiB/s is shared by every read, and
    # all 8 chunks take 2 simulated s, within the 5 s stall_timeout.
    spec = SimSpec(nodes=4, image_size=8 * MiB, chunk_size=MiB, link_rate=LINK, origin_rate=4 * MiB)
    result = simulate(spec)
    assert_all_finished(result)
    assert result.origin_bytes == spec.image_size
    assert result.last >= spec.image_size / spec.origin_rate


class _SpinGuard(SimCluster):
    """Fails instead of looping forever when a node is stepped at one instant."""

    max_steps = 20_000

    def __init__(self, spec: SimSpec) -> None:
        super().__init__(spec)
        self.steps = 0

    def _step(self, rank: int) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise RuntimeError(f"node {rank} stepped {self.steps} times, stuck at t={self.now}")
        super()._step(rank)


def test_origin_slower_than_stall_timeout_does_not_spin() -> None:
    # Two 4 MiB reads share 0.5 MB/s: each takes ~17 simulated s, over the
    # 5 s stall_timeout. next_deadline() then stays at the stall time, and
    # the simulator re-arms the timer at the same instant forever.
    spec = SimSpec(
        nodes=1, image_size=4 * CHUNK, chunk_size=CHUNK, link_rate=LINK, origin_rate=0.5e6
    )
    cluster = _SpinGuard(spec)
    result = cluster.run()
    assert_all_finished(result)
    assert result.last >= spec.image_size / spec.origin_rate


def test_sim_counts_origin_bytes_as_the_swarms_do() -> None:
    spec = dataclasses.replace(BIG, nodes=8)
    cluster = SimCluster(spec)
    result = cluster.run()
    assert_all_finished(result)
    assert result.origin_bytes == sum(s.bytes_from_origin for s in cluster.swarms)
    for swarm in cluster.swarms:
        assert swarm.bytes_from_origin + swarm.bytes_from_peers >= spec.image_size


# ---- the rate model ----------------------------------------------------------


def _rates(spec: SimSpec, flows: list[tuple[int, int]]) -> list[float]:
    """Start ``flows`` (src, dst; -1 = the origin) by hand; their rates."""
    cluster = SimCluster(spec)
    for src, dst in flows:
        cluster._start_flow(src, dst, 0)
    return [flow.rate for flow in cluster.flows.values()]


def test_local_rates_share_each_link_equally_and_take_the_tighter_end() -> None:
    spec = SimSpec(nodes=4, image_size=CHUNK, chunk_size=CHUNK, link_rate=100.0,
                   origin_rate=1000.0, goodput=0.9)  # fmt: skip
    # 0 sends to 1 and 2; 3 sends to 1: 0's uplink is split two ways, 1's
    # downlink two ways; every flow gets half a link, of which 0.9 is payload.
    assert _rates(spec, [(0, 1), (0, 2), (3, 1)]) == pytest.approx([45.0] * 3)
    # The origin's 1000 split 4 ways would give 250: node 1's downlink caps it.
    got = _rates(spec, [(-1, 1), (-1, 2), (-1, 3), (-1, 0)])
    assert got == pytest.approx([90.0] * 4)


def test_local_rates_are_a_lower_bound_of_max_min() -> None:
    # 0 -> 1, 0 -> 2, 3 -> 2: flow 0 -> 1 could take what 0 -> 2 leaves (2's
    # downlink holds it to half), as max-min fairness does; the local model
    # leaves it at 0's equal share. That is the documented approximation.
    flows = [(0, 1), (0, 2), (3, 2)]
    local = dataclasses.replace(BIG, nodes=4, goodput=1.0)
    assert _rates(local, flows) == pytest.approx([LINK / 2] * 3)
    exact = dataclasses.replace(local, exact_rates=True)
    assert _rates(exact, flows) == pytest.approx([LINK / 2] * 3)
    # A case where they differ: 0 -> 2 is also held by 2's three downloads.
    flows = [(0, 1), (0, 2), (3, 2), (1, 2)]
    got, want = _rates(local, flows), _rates(exact, flows)
    assert got[0] == pytest.approx(LINK / 2) and want[0] == pytest.approx(2 * LINK / 3)
    assert all(g <= w * (1 + 1e-9) for g, w in zip(got, want, strict=True))


def test_local_rate_model_stays_close_to_max_min_on_small_clusters() -> None:
    """Mean finish time over seeds: within 4 % of the exact model at N=16.

    Measured (128 MiB, 100 Mbit/s links, 4 seeds): the local model is 0.7 to
    1.7 % slower for N = 8 ... 64; single runs differ more, because any
    change of rates reorders the scheduler's choices.
    """
    base = SimSpec(nodes=16, image_size=64 * MiB, chunk_size=CHUNK, link_rate=12.5e6,
                   origin_rate=125e6)  # fmt: skip
    means = []
    for exact in (False, True):
        runs = [simulate(dataclasses.replace(base, seed=s, exact_rates=exact)) for s in (1, 2, 3)]
        for run in runs:
            assert_all_finished(run)
        means.append(statistics.mean(t for r in runs for t in r.finish_times.values()))
    local, exact_mean = means
    assert exact_mean * 0.995 <= local <= exact_mean * 1.04


def test_goodput_slows_transfers_in_proportion() -> None:
    spec = dataclasses.replace(BIG, nodes=1, goodput=1.0)
    full = simulate(spec)
    headers = simulate(dataclasses.replace(spec, goodput=0.955))
    assert headers.last == pytest.approx(full.last / 0.955, rel=0.01)


# ---- many nodes over partial views -------------------------------------------


def test_1024_nodes_over_partial_views_finish_reading_the_origin_once() -> None:
    # Four chunks keep this to a few seconds: the cost is the start-up, when
    # a thousand nodes ask the few holders (and mostly hear "busy"). The
    # 4096-node, 256-chunk runs are the benchmark's (bench/sim_bench.py).
    # initial_rate as the daemon's operator would set it: the link's rate (the
    # default, 1 Gbit/s, makes busy back-offs 8x too short on these links).
    spec = SimSpec(nodes=1024, image_size=4 * CHUNK, chunk_size=CHUNK, link_rate=12.5e6,
                   origin_rate=125e6, latency=1e-4,
                   config=SwarmConfig(initial_rate=12.5e6))  # fmt: skip
    cluster = SimCluster(spec)
    result = cluster.run()
    assert_all_finished(result)
    assert result.origin_bytes <= 1.05 * spec.image_size
    assert max(len(s.peers) for s in cluster.swarms) <= overlay.DEGREE
    # Simulated time, in chunk times (floor / 4): the fan-out to 1024 nodes
    # takes at least log2(1024) = 10 hops (measured: 27 chunk times), a ring
    # would need 1023 + 4. 40 fails if the swarm degenerates towards a ring.
    chunk_time = spec.floor / 4
    assert 10 * chunk_time <= result.last < 40 * chunk_time


def _others_last(n: int, fault: str) -> tuple[float, float]:
    """(last finish among the healthy nodes, fault-free last) for an N-node run
    of 64 chunks on 100 Mbit/s links with a 1 Gbit/s origin."""
    spec = SimSpec(
        nodes=n, image_size=64 * CHUNK, chunk_size=CHUNK, link_rate=12.5e6, origin_rate=125e6
    )
    base = SimCluster(spec).run().last
    cluster = SimCluster(spec)
    bad = n // 2
    if fault == "straggler":
        cluster.scale_node(bad, 0.25)
    else:
        cluster.kill_at_progress(bad, 0.5)
    result = cluster.run()
    assert result.origin_bytes <= 1.05 * spec.image_size
    return max(t for rank, t in result.finish_times.items() if rank != bad), base


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("fault", ["straggler", "kill"])
def test_healthy_nodes_finish_within_1_3_of_fault_free(n: int, fault: str) -> None:
    # Issue 3's robustness target, in simulated time: a quarter-rate node, or
    # one killed half-way, must not hold the others back by more than 30 %.
    others, base = _others_last(n, fault)
    assert others <= 1.3 * base, f"{fault} N={n}: {others / base:.2f} x fault-free"
