"""50 broadcasts in a row through real daemons leak no fds, memory, mounts or processes.

Issue 6, point 6. Three ``p2pcast daemon`` processes on 127.0.0.2-4 (secret
peer auth), 50 different images (alternately SquashFS and tar, 4-8 MiB), each
pushed, fetched on all three, staged for a job (kernel loop mount, unpacked
tree) and released, with a cache-gc every 5 cycles; the figures and their
bounds are bench/leak_check.py's, which also regenerates
bench/results/leaks.json. Needs root and mksquashfs; ~20 s on 2 CPUs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import leak_check
from tests.test_stage_support import is_root, need, need_tool

pytestmark = pytest.mark.slow

CYCLES = 50


def test_fifty_broadcasts_leak_nothing(tmp_path: Path) -> None:
    need(is_root(), "root (kernel loop mounts, the root-only stage/release ops)")
    need_tool("mksquashfs", "squashfs-tools")
    work = tmp_path / "work"
    try:
        result = leak_check.run(CYCLES, work)
        # Nothing below the work directory once the run is over.
        assert leak_check.mounts_under(work) == []
        assert leak_check.loops_under(work) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)  # images, caches: ~100 MiB
    # Kept with the test's output for a look when it fails.
    (tmp_path / "leaks.json").write_text(json.dumps(result, indent=1))

    base = leak_check.baseline_index(result)
    assert base == leak_check.WARMUP - 1  # the reading after the warm-up's gc
    for name, series in result["nodes"].items():
        assert len(series["fds"]) == CYCLES, name
        # Between gcs each complete image is seeded (its image and stored files
        # open): the count rises, and falls back at every gc. A leak would
        # raise the floor; FD_SLACK allows a link reconnecting at the reading.
        after_gc = series["fds"][base :: leak_check.GC_EVERY]
        assert max(after_gc) <= after_gc[0] + leak_check.FD_SLACK, (name, after_gc)
    # Every bound (fds, RSS, threads, children, mounts, loop devices, staged
    # copies, job records, cache) in one list with the figures that broke it.
    assert leak_check.violations(result) == []
    # Real broadcasts: the nodes relayed chunks to each other in every cycle
    # (not three origin reads), every cycle staged (checked in the run), and
    # nothing stayed mounted after any release.
    assert all(n > 0 for n in result["per_cycle"]["from_peers"]), result["per_cycle"]
    assert result["per_cycle"]["mounts"] == [0] * CYCLES
