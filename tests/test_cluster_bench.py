"""bench/cluster_bench.py end to end, small: N=2, 16 MiB, 200mbit, all four methods.

Builds a real emulated cluster (network namespaces, as root), so it is skipped
when not root, or when curl / netcat-openbsd / aria2 / opentracker are missing;
under CI (CI set) a missing root fails, as in test_cluster_tool.py. The cluster
has a name and subnet of its own, and the test checks that it is gone afterwards
with nothing left running in it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench import cluster_bench
from tools import cluster as cl

pytestmark = pytest.mark.slow

FIELDS = {
    "method", "nodes", "ok", "verified", "first_seconds", "median_seconds", "last_seconds",
    "first_ratio", "median_ratio", "last_ratio", "origin_bytes", "origin_ratio",
    "origin_wire_bytes", "cpu_seconds", "cpu_cores", "machine_busy_pct", "per_node",
}  # fmt: skip


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not (shutil.which("ip") or Path("/usr/sbin/ip").exists()):
        return "needs iproute2"
    for tool, package in (
        ("curl", "curl"), ("nc", "netcat-openbsd"), ("ss", "iproute2"), ("aria2c", "aria2"),
        ("opentracker", "opentracker"),
    ):  # fmt: skip
        if shutil.which(tool) is None:
            return f"needs {tool} ({package})"
    return None


@pytest.mark.timeout(120)
def test_cluster_bench_small(tmp_path: Path) -> None:
    reason = _missing()
    if reason:
        if os.environ.get("CI") and reason == "needs root":
            pytest.fail(f"CI must run the cluster tests: {reason}")
        pytest.skip(reason)
    name = f"cb{os.getpid() % 100000}"
    out = tmp_path / "cluster.json"
    argv = [
        "--nodes", "2", "--rate", "200mbit", "--size", "16M",
        "--methods", "p2pcast,http,chain,aria2", "--out", str(out),
        "--name", name, "--subnet", "198.19.252.0/24", "--settle", "0.1",
        "--timeout", "60", "--workdir", str(tmp_path / "work"), "--quiet",
    ]  # fmt: skip
    try:
        rc = cluster_bench.main(argv)
    finally:
        assert cl.main(["down", "--name", name]) == 0  # idempotent; a no-op when clean
    result = json.loads(out.read_text())
    assert rc == 0, result["runs"]
    size = result["image"]["size"]
    assert size >= 16 << 20
    assert result["floor_seconds"] == pytest.approx(size / 25e6, rel=1e-3)
    assert {"cpus", "note"} <= set(result["machine"])
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"p2pcast", "http", "chain", "aria2"}
    for method, r in runs.items():
        assert set(r) >= FIELDS, (method, sorted(FIELDS - set(r)))
        assert r["ok"] and r["verified"] == 2, r
        assert set(r["per_node"]) == {"n1", "n2"}
        assert all(n["sha256_ok"] for n in r["per_node"].values())
        assert 0 < r["first_seconds"] <= r["median_seconds"] <= r["last_seconds"] < 60
        # nothing beats the shaped link: each node needs at least (stored bytes) / B
        assert r["last_ratio"] > 0.5, r
        assert 0 <= r["machine_busy_pct"] <= 100
    assert runs["http"]["origin_bytes"] == 2 * size
    assert runs["chain"]["origin_bytes"] == size
    # p2pcast reads each stored chunk about once (stored <= size: zstd where it pays)
    assert runs["p2pcast"]["origin_bytes"] <= 1.2 * size
    assert runs["http"]["origin_wire_bytes"] >= 2 * size
    # aria2: the origin's seeder uploads at least one copy, at most one per node
    assert size <= runs["aria2"]["origin_bytes"] <= 2 * size
    assert runs["aria2"]["piece_length"] == 1 << 20
    assert result["params"]["piece_length"] == 1 << 20
    # cleaned up: no namespace, no state file, no scratch
    assert not any(ns.startswith(f"{name}-") for ns in _namespaces())
    assert not cl.state_path(name).exists()
    assert not (tmp_path / "work").exists()
    assert not list(Path(tempfile.gettempdir()).glob("p2pcast-tracker-*"))


def _namespaces() -> list[str]:
    try:
        return [e.name for e in cl.NETNS_DIR.iterdir()]
    except OSError:
        return []
