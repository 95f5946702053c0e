"""Many nodes in one process: the real scheduler on the simulator's fake clock.

All times here are simulated seconds from a deterministic discrete-event run,
so bounds on them are exact properties of the code, not of the machine that
runs the tests.
"""

from __future__ import annotations

import dataclasses

from p2pcast.sim import SimCluster, SimResult, SimSpec, simulate

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
    # Its chunks were read by its backup owner, rank 4, and by nobody else.
    assert cluster.swarms[4].bytes_from_origin > cluster.swarms[5].bytes_from_origin


def test_straggler_does_not_stop_the_swarm() -> None:
    result = simulate(BIG, lambda cluster: cluster.scale_node(7, 0.25))
    assert_all_finished(result)
    assert result.origin_bytes <= 1.05 * BIG.image_size
    # Simulated time. Its downlink runs at a quarter: it cannot finish
    # before 4 S/B; nobody should need much more than that.
    assert result.finish_times[7] >= 4 * BIG.floor
    assert result.last < 3 * ring_floor(BIG), f"ratio {result.ratio:.2f}"


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
