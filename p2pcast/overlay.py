"""Who talks to whom in one broadcast: a bounded, deterministic peer view.

With thousands of nodes a node cannot keep a connection, a bitfield and an
announcement stream per other node: announcements alone would cost N^2
messages per chunk. Each rank instead sees a neighbour set of at most
:data:`DEGREE` ranks, computed alike by every node from ``(rank, size)``
alone, so building the overlay needs no messages.

The graph is built the same way on every node, from ``size`` alone:

* first the ring (rank r is adjacent to r-1 and r+1), so the ring
  predecessor and successor the scheduler relies on are always in the view;
* then edges between consecutive ranks of seeded pseudo-random orders of all
  ranks (random Hamiltonian cycles), each kept only while both ends have
  fewer than DEGREE neighbours. A union of a few random Hamiltonian cycles is
  an expander with high probability: every set of nodes has many edges
  leaving it, so a chunk reaches everyone in about log(N) / log(DEGREE - 1)
  hops (diameter 4 at 4096 nodes), and a neighbourhood is a fair sample of
  the swarm for rarest-first choice. Passes continue until a pass adds
  nothing or :data:`MAX_PASSES` is reached, which brings almost every rank to
  DEGREE even when the cycles overlap a lot (a few dozen ranks).

Edges are added in pairs, so the graph is symmetric (r sees s iff s sees r:
both ends of a link agree it exists); the ring keeps it connected; no rank
has more than DEGREE neighbours. Up to :data:`FULL_MESH` ranks every rank
sees all the others, exactly as before the overlay existed.
"""

from __future__ import annotations

import functools
import random

#: Ranks a node exchanges chunks and announcements with. 24 keeps the per-node
#: cost small (24 connections, 24 announcements per chunk) while the random
#: part still makes the diameter 3-4 at 4096 nodes.
DEGREE = 24

#: Up to this many ranks, everyone sees everyone (a full mesh), as before the
#: overlay existed. 63 connections per node are cheap, and a full view
#: schedules better: in the simulator (64 nodes, 64 chunks, 100 Mbit/s) a
#: DEGREE-24 view made the last node 3-4 % later than the full mesh.
FULL_MESH = 64

#: Random orders tried at most. Each pass gives every rank up to two more
#: neighbours, so DEGREE passes would do if orders never overlapped; twice as
#: many fill the gaps left where they do (the graph costs O(MAX_PASSES * size)
#: to build: a quarter of a second at 4096 ranks, once per broadcast).
MAX_PASSES = 2 * DEGREE

#: Seed of the pseudo-random orders. Fixed, not configurable: every node must
#: compute the same graph, and a seed that differed between two daemons would
#: give asymmetric views.
SEED = 0x9E3779B9


@functools.lru_cache(maxsize=4)
def graph(
    size: int, degree: int = DEGREE, full_mesh: int = FULL_MESH
) -> tuple[tuple[int, ...], ...]:
    """Every rank's neighbours (sorted), for a swarm of ``size`` ranks.

    ``degree`` and ``full_mesh`` replace :data:`DEGREE` and :data:`FULL_MESH`
    (tests use small ones to get partial views with a few nodes). Every node
    of a broadcast must use the same values, or the views are not symmetric.
    Cached: the simulator asks for every rank of the same size.
    """
    if degree < 2:
        raise ValueError(f"degree {degree} leaves no room for the ring (at least 2)")
    if size <= max(full_mesh, degree + 1):
        return tuple(tuple(r for r in range(size) if r != rank) for rank in range(size))
    adjacent: list[set[int]] = [{(r - 1) % size, (r + 1) % size} for r in range(size)]
    rng = random.Random(SEED ^ size)
    order = list(range(size))
    for _ in range(2 * degree):  # MAX_PASSES for the default degree
        rng.shuffle(order)
        added = 0
        for place, rank in enumerate(order):
            other = order[place - 1]  # place 0 pairs with the last: a cycle
            mine, theirs = adjacent[rank], adjacent[other]
            if other not in mine and len(mine) < degree and len(theirs) < degree:
                mine.add(other)
                theirs.add(rank)
                added += 1
        if not added:
            break
    return tuple(tuple(sorted(a)) for a in adjacent)


def neighbours(
    rank: int, size: int, *, degree: int = DEGREE, full_mesh: int = FULL_MESH
) -> tuple[int, ...]:
    """The ranks ``rank`` sees, sorted; every other rank when the swarm is small."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    return graph(size, degree, full_mesh)[rank]
