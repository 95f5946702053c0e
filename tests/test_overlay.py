"""The overlay: bounded, symmetric, connected peer views with a small diameter."""

from __future__ import annotations

from collections import deque

import pytest

from p2pcast.overlay import DEGREE, FULL_MESH, graph, neighbours


def distances(size: int, start: int) -> dict[int, int]:
    """Hops from ``start`` to every rank it can reach (breadth-first)."""
    seen = {start: 0}
    queue = deque([start])
    while queue:
        rank = queue.popleft()
        for other in neighbours(rank, size):
            if other not in seen:
                seen[other] = seen[rank] + 1
                queue.append(other)
    return seen


@pytest.mark.parametrize("size", [1, 2, 3, 5, DEGREE, DEGREE + 1, FULL_MESH])
def test_small_swarms_see_everyone(size: int) -> None:
    for rank in range(size):
        assert neighbours(rank, size) == tuple(r for r in range(size) if r != rank)


@pytest.mark.parametrize("size", [FULL_MESH + 1, FULL_MESH + 2, 100, 257, 1000, 4096])
def test_views_are_bounded_symmetric_and_hold_the_ring(size: int) -> None:
    views = [set(neighbours(rank, size)) for rank in range(size)]
    for rank, view in enumerate(views):
        assert rank not in view
        assert len(view) <= DEGREE
        assert {(rank - 1) % size, (rank + 1) % size} <= view
        for other in view:
            assert rank in views[other], f"{rank} sees {other} but not the reverse"
    # The random part really adds neighbours: close to DEGREE on average,
    # not just the two ring neighbours.
    assert sum(map(len, views)) / size >= DEGREE - 2


# Diameter of a random graph of degree d on N nodes: about log(N) / log(d - 1)
# (2.6 at 4096 for d = 24); these bounds leave one hop of slack.
@pytest.mark.parametrize(("size", "diameter"), [(100, 3), (1000, 4), (4096, 5)])
def test_connected_with_a_small_diameter(size: int, diameter: int) -> None:
    # Eccentricity from a spread of starting ranks: the graph is connected
    # (each reaches all) and no rank found is further than the bound.
    for start in range(0, size, max(1, size // 16)):
        hops = distances(size, start)
        assert len(hops) == size
        assert max(hops.values()) <= diameter


def test_views_are_deterministic_and_differ_between_sizes() -> None:
    first = [neighbours(rank, 500) for rank in range(500)]
    graph.cache_clear()  # computed afresh, as on another node
    assert [neighbours(rank, 500) for rank in range(500)] == first
    # The seed depends on the size: a different swarm is a different graph,
    # not the same graph with ranks renumbered.
    assert neighbours(7, 501) != first[7]


@pytest.mark.parametrize(("rank", "size"), [(-1, 4), (4, 4), (0, 0)])
def test_rank_outside_size_is_refused(rank: int, size: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        neighbours(rank, size)
