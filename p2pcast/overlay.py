"""Who talks to whom in one broadcast: a bounded, deterministic peer view.

With thousands of nodes a node cannot keep a connection, a bitfield and an
announcement stream per other node: announcements alone would cost N^2
messages per chunk. Each rank instead sees a neighbour set of at most
:data:`DEGREE` ranks, computed alike by every node from ``(rank, size)``
alone, so building the overlay needs no messages.

The graph is the union of :data:`CYCLES` Hamiltonian cycles over the ranks:

* cycle 0 is the ring (rank r is adjacent to r-1 and r+1), so the ring
  predecessor and successor the scheduler relies on are always in the view;
* the others visit the ranks in seeded pseudo-random orders. A union of a few
  random Hamiltonian cycles is an expander with high probability: every set
  of nodes has many edges leaving it, so a chunk reaches everyone in about
  log(N) / log(DEGREE - 1) hops, and a neighbourhood holds a fair sample of
  the swarm for rarest-first choice.

Each cycle contributes the two ranks next to r in it, so the graph is
symmetric (r sees s iff s sees r: both ends of a link agree it exists),
connected (the ring alone spans everyone) and of degree at most
``2 * CYCLES`` (less where cycles share an edge). When ``size <= DEGREE + 1``
every rank sees all the others, exactly as before the overlay existed.
"""

from __future__ import annotations

import functools
import random

#: Ranks a node exchanges chunks and announcements with. 24 keeps the per-node
#: cost small (24 connections, 24 announcements per chunk) while the random
#: part still makes the diameter 3-4 at 4096 nodes, and every cluster up to 25
#: nodes (most jobs) keeps the full mesh it had before.
DEGREE = 24

#: Hamiltonian cycles in the union: each gives every rank two neighbours.
CYCLES = DEGREE // 2

#: Seed of the pseudo-random cycles. Fixed, not configurable: every node must
#: compute the same graph, and a seed that differed between two daemons would
#: give asymmetric views.
SEED = 0x9E3779B9


@functools.lru_cache(maxsize=8)
def _orders(size: int) -> tuple[tuple[list[int], list[int]], ...]:
    """The random cycles for ``size`` ranks: (order, position of each rank).

    O(CYCLES * size) once per size, then O(1) per rank; cached because the
    simulator asks for every rank of the same size.
    """
    rng = random.Random(SEED ^ size)
    cycles = []
    for _ in range(CYCLES - 1):
        order = list(range(size))
        rng.shuffle(order)
        position = [0] * size
        for place, rank in enumerate(order):
            position[rank] = place
        cycles.append((order, position))
    return tuple(cycles)


def neighbours(rank: int, size: int) -> tuple[int, ...]:
    """The ranks ``rank`` sees, sorted; every other rank when the swarm is small."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    if size <= DEGREE + 1:
        return tuple(r for r in range(size) if r != rank)
    seen = {(rank - 1) % size, (rank + 1) % size}
    for order, position in _orders(size):
        place = position[rank]
        seen.add(order[place - 1])  # place 0 wraps to the end: it is a cycle
        seen.add(order[(place + 1) % size])
    seen.discard(rank)
    return tuple(sorted(seen))
