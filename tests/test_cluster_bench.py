"""bench/cluster_bench.py end to end, small: N=2, 16 MiB, 200mbit, all four methods;
and N=4 with a straggler and a killed node (p2pcast, and the chain it beats).

The end-to-end tests build real emulated clusters (network namespaces, as root),
so they are skipped when not root, or when curl / netcat-openbsd / aria2 /
opentracker are missing; under CI (CI set) a missing root fails, as in
test_cluster_tool.py. Each cluster has a name and subnet of its own, and the
tests check that it is gone afterwards with nothing left running in it. The
helpers that split a fault run's times are tested without a cluster.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bench import cluster_bench
from bench import cluster_methods as cm
from tools import cluster as cl

FIELDS = {
    "method", "nodes", "ok", "verified", "first_seconds", "median_seconds", "last_seconds",
    "first_ratio", "median_ratio", "last_ratio", "origin_bytes", "origin_ratio",
    "origin_wire_bytes", "cpu_seconds", "cpu_cores", "machine_busy_pct", "per_node",
}  # fmt: skip


ALL_TOOLS = (
    ("curl", "curl"), ("nc", "netcat-openbsd"), ("ss", "iproute2"), ("aria2c", "aria2"),
    ("opentracker", "opentracker"),
)  # fmt: skip


def _missing(tools: tuple[tuple[str, str], ...] = ALL_TOOLS) -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not (shutil.which("ip") or Path("/usr/sbin/ip").exists()):
        return "needs iproute2"
    for tool, package in tools:
        if shutil.which(tool) is None:
            return f"needs {tool} ({package})"
    return None


def _require(tools: tuple[tuple[str, str], ...] = ALL_TOOLS) -> None:
    reason = _missing(tools)
    if reason:
        if os.environ.get("CI") and reason == "needs root":
            pytest.fail(f"CI must run the cluster tests: {reason}")
        pytest.skip(reason)


def _run(tmp_path: Path, name: str, subnet: str, args: list[str]) -> tuple[int, dict[str, Any]]:
    """cluster_bench.main on cluster NAME in SUBNET, quiet, scratch under TMP_PATH; the
    cluster is taken down whatever happens (a no-op when the run cleaned up)."""
    out = tmp_path / "result.json"
    common = ["--out", str(out), "--name", name, "--subnet", subnet, "--settle", "0.1",
              "--workdir", str(tmp_path / "work"), "--quiet"]  # fmt: skip
    try:
        rc = cluster_bench.main(args + common)
    finally:
        assert cl.main(["down", "--name", name]) == 0  # idempotent; a no-op when clean
    return rc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_bench_small(tmp_path: Path) -> None:
    _require()
    name = f"cb{os.getpid() % 100000}"
    argv = [
        "--nodes", "2", "--rate", "200mbit", "--size", "16M",
        "--methods", "p2pcast,http,chain,aria2", "--timeout", "60",
    ]  # fmt: skip
    rc, result = _run(tmp_path, name, "198.19.252.0/24", argv)
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


# ---- faults: a real run -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)  # ~25 s here; the budget is 60 s
def test_cluster_bench_faults(tmp_path: Path) -> None:
    """N=4: fault-free, then n3 (rank N//2) at a quarter of the rate, then n3 killed at
    half its progress. p2pcast's other nodes all end verified; the chain's cannot
    once a hop dies, and that is reported as a result (exit status 0), not an error."""
    _require((("nc", "netcat-openbsd"), ("ss", "iproute2")))
    name = f"cf{os.getpid() % 100000}"
    argv = [
        "--nodes", "4", "--rate", "200mbit", "--size", "16M", "--chunk-size", "1M",
        "--methods", "p2pcast,chain", "--scenarios", "kill,straggler,fault-free",
        "--timeout", "30", "--plot",
    ]  # fmt: skip
    rc, result = _run(tmp_path, name, "198.19.253.0/24", argv)
    assert rc == 0, result["runs"]
    # fault-free runs first, whatever the order asked
    assert result["params"]["scenarios"] == ["fault-free", "straggler", "kill"]
    assert [r["scenario"] for r in result["runs"]] == [
        "fault-free", "fault-free", "straggler", "straggler", "kill", "kill",
    ]  # fmt: skip
    runs = {(r["method"], r["scenario"]): r for r in result["runs"]}
    free = runs["p2pcast", "fault-free"]
    assert free["ok"] and free["faulty_node"] is None and "others_total" not in free

    slow = runs["p2pcast", "straggler"]
    assert slow["ok"], slow
    assert slow["faulty_node"] == "n3" and slow["per_node"]["n3"]["straggler"]
    assert slow["others_total"] == slow["others_completed"] == 3
    assert all(n["sha256_ok"] for n in slow["per_node"].values())
    assert slow["others_first_seconds"] <= slow["others_median_seconds"]
    assert slow["others_median_seconds"] <= slow["others_last_seconds"]
    # the straggler's link really is a quarter: 50mbit carries its stored bytes no faster
    assert slow["faulty_seconds"] > 0.8 * slow["stored_bytes"] / (50e6 / 8)
    assert slow["fault_free_last_seconds"] == free["last_seconds"]
    assert slow["others_last_vs_fault_free"] == pytest.approx(
        slow["others_last_seconds"] / free["last_seconds"], abs=2e-3
    )

    kill = runs["p2pcast", "kill"]
    assert kill["ok"], kill
    assert kill["faulty_node"] == "n3" and kill["per_node"]["n3"]["killed"]
    assert kill["per_node"]["n3"]["sha256_ok"] is False  # not verified: it is dead
    assert kill["others_completed"] == kill["verified"] == 3
    assert all(kill["per_node"][n]["sha256_ok"] for n in ("n1", "n2", "n4"))
    assert 0.5 <= kill["killed_progress"] < 1.0 and kill["killed_pids"]
    assert 0 < kill["killed_at_seconds"] < kill["others_last_seconds"]
    assert kill["others_last_vs_fault_free"] > 0

    chain = runs["chain", "kill"]
    assert "error" not in chain and not chain["ok"], chain
    assert chain["others_completed"] < 3 and "survivors" in chain["failure"]
    assert chain["others_last_vs_fault_free"] is None
    assert runs["chain", "straggler"]["ok"]
    assert (tmp_path / "result_faults.png").stat().st_size > 0
    assert not any(ns.startswith(f"{name}-") for ns in _namespaces())
    assert not cl.state_path(name).exists()


# ---- faults: the helpers ------------------------------------------------------------


def test_faulty_node_is_rank_n_over_2() -> None:
    assert [cluster_bench.faulty_node(n) for n in (2, 3, 4, 5, 16)] == [
        "n2", "n2", "n3", "n3", "n9",
    ]  # fmt: skip


def test_split_faulty_straggler() -> None:
    seconds = {"n1": 2.0, "n2": 3.0, "n3": 9.0, "n4": 4.0}
    ok = dict.fromkeys(seconds, True)
    got = cluster_bench.split_faulty(4, seconds, ok, "straggler", "n3")
    assert got == {
        "others_total": 3, "others_completed": 3, "others_first_seconds": 2.0,
        "others_median_seconds": 3.0, "others_last_seconds": 4.0, "faulty_seconds": 9.0,
        "ok": True,
    }  # fmt: skip
    # a straggler without a verified copy fails the scenario, the others still count
    got = cluster_bench.split_faulty(4, seconds, ok | {"n3": False}, "straggler", "n3")
    assert not got["ok"] and got["faulty_seconds"] is None and got["others_last_seconds"] == 4.0


def test_split_faulty_kill_counts_verified_survivors_only() -> None:
    # n3 killed (absent); n4 ended with a broken copy (a chain); n2 never ended
    seconds = {"n1": 1.0, "n4": 1.5}
    ok = {"n1": True, "n4": False}
    got = cluster_bench.split_faulty(4, seconds, ok, "kill", "n3")
    assert got["others_completed"] == 1 and got["others_total"] == 3 and not got["ok"]
    assert got["others_first_seconds"] == got["others_median_seconds"] == 1.0
    assert got["others_last_seconds"] is None  # not all done: no "last" to compare
    assert got["faulty_seconds"] is None
    nobody = cluster_bench.split_faulty(3, {}, {}, "kill", "n2")
    assert nobody["others_completed"] == 0 and nobody["others_first_seconds"] is None


def _rec(method: str, n: int, last: float, **kw: Any) -> dict[str, Any]:
    return {"method": method, "nodes": n, "last_seconds": last, "ok": True} | kw


def test_fault_free_last() -> None:
    records = [
        _rec("p2pcast", 4, 3.0),  # an old record, without a scenario: fault-free
        _rec("p2pcast", 4, 5.0, scenario="fault-free"),
        _rec("p2pcast", 4, 4.0, scenario="fault-free"),
        _rec("p2pcast", 4, 1.0, scenario="fault-free", ok=False),
        _rec("p2pcast", 4, 9.0, scenario="straggler"),
        _rec("p2pcast", 2, 1.0, scenario="fault-free"),
        _rec("chain", 4, 2.0, scenario="fault-free"),
        {"method": "http", "nodes": 4, "ok": False, "error": "boom"},
    ]
    assert cluster_bench.fault_free_last(records, "p2pcast", 4) == 4.0  # median of 3, 4, 5
    assert cluster_bench.fault_free_last(records, "chain", 4) == 2.0
    assert cluster_bench.fault_free_last(records, "http", 4) is None
    assert cluster_bench.fault_free_last(records, "aria2", 4) is None


def _image() -> dict[str, Any]:
    return {"size": 1000, "sha256": "x"}


def test_summarize_kill_record() -> None:
    run = cm.MethodRun(
        seconds={"n1": 2.0, "n2": 2.6, "n4": 2.2},
        paths={},
        wall_seconds=2.7,
        origin_bytes=1000,
        extra={
            "cpu": {"cpu_seconds": 1.0, "cpu_cores": 0.5, "machine_busy_pct": 50.0},
            "kill": {"killed_at_seconds": 1.1, "killed_progress": 0.53, "killed_pids": [7]},
        },
    )
    ok = {"n1": True, "n2": True, "n4": True}
    fault = cm.Fault("kill", "n3")
    rec = cluster_bench.summarize("p2pcast", 4, 0, run, ok, _image(), 1.0, 1100, fault, 2.0)
    assert rec["scenario"] == "kill" and rec["faulty_node"] == "n3" and rec["ok"]
    assert rec["others_last_seconds"] == rec["last_seconds"] == 2.6
    assert rec["fault_free_last_seconds"] == 2.0 and rec["others_last_vs_fault_free"] == 1.3
    assert rec["killed_progress"] == 0.53 and rec["kill_at"] == 0.5
    assert rec["per_node"]["n3"] == {"seconds": None, "sha256_ok": False, "killed": True}
    assert list(rec["per_node"]) == ["n1", "n2", "n3", "n4"]
    assert "failure" not in rec
    assert "n3" in cluster_bench._row(rec) and cluster_bench.healthy(rec)
    # no fault-free run in this invocation: no ratio
    alone = cluster_bench.summarize("p2pcast", 4, 0, run, ok, _image(), 1.0, 1100, fault)
    assert "others_last_vs_fault_free" not in alone and "fault_free_last_seconds" not in alone


def test_summarize_failed_kill_is_a_result() -> None:
    run = cm.MethodRun(
        seconds={"n1": 0.4, "n2": 0.4, "n4": 0.4},
        paths={},
        wall_seconds=0.5,
        origin_bytes=1000,
        extra={
            "cpu": {"cpu_seconds": 1.0, "cpu_cores": 0.5, "machine_busy_pct": 50.0},
            "incomplete": {"origin": "exit status 1"},
        },
    )
    ok = dict.fromkeys(run.seconds, False)
    fault = cm.Fault("kill", "n3")
    rec = cluster_bench.summarize("chain", 4, 0, run, ok, _image(), 1.0, 600, fault, 1.0)
    assert not rec["ok"] and rec["others_completed"] == 0
    assert rec["failure"] == "0 of 3 survivors completed with a verified copy"
    assert rec["last_seconds"] is None and rec["others_last_vs_fault_free"] is None
    assert cluster_bench.healthy(rec)  # a result, not a broken benchmark
    assert "FAILED" in cluster_bench._row(rec)
    broken = {"method": "chain", "nodes": 4, "scenario": "kill", "ok": False, "error": "x"}
    assert not cluster_bench.healthy(broken)
    failed_straggler = dict(rec, scenario="straggler")
    assert not cluster_bench.healthy(failed_straggler)


def test_fault_free_record_unchanged() -> None:
    """Fault-free records keep today's fields and values (and gain the scenario's)."""
    run = cm.MethodRun(
        seconds={"n1": 1.0, "n2": 3.0},
        paths={},
        wall_seconds=3.0,
        origin_bytes=1000,
        extra={"cpu": {"cpu_seconds": 1.0, "cpu_cores": 0.5, "machine_busy_pct": 50.0}},
    )
    rec = cluster_bench.summarize("http", 2, 0, run, {"n1": True, "n2": True}, _image(), 2.0, 9)
    assert rec["scenario"] == "fault-free" and rec["faulty_node"] is None
    assert (rec["first_seconds"], rec["median_seconds"], rec["last_seconds"]) == (1.0, 2.0, 3.0)
    assert rec["last_ratio"] == 1.5
    assert not {k for k in rec if k.startswith(("others_", "faulty_s", "kill"))}
    assert cluster_bench._row(rec).startswith("http       2    1.00    2.00    3.00")


def test_plot_faults(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [
        _rec("p2pcast", 4, 3.0, scenario="fault-free", first_seconds=2.0),
        _rec("chain", 4, 2.0, scenario="fault-free", first_seconds=1.0),
        _rec("p2pcast", 4, 3.3, scenario="kill", others_last_vs_fault_free=1.1),
        _rec("chain", 4, math.nan, scenario="kill", ok=False, others_completed=0,
             others_total=3, others_last_vs_fault_free=None),
        _rec("p2pcast", 4, 9.0, scenario="straggler", others_last_vs_fault_free=3.0),
        {"method": "chain", "nodes": 4, "scenario": "straggler", "ok": False, "error": "x"},
    ]  # fmt: skip
    result = {"runs": runs, "floor_seconds": 1.0, "params": {"size_human": "1M", "rate": "1gbit"}}
    written = cluster_bench.plot(result, tmp_path / "r.json")
    assert {p.name for p in written} == {"r_faults.png", "r_time.png", "r_ratio.png"}
    assert all(p.stat().st_size > 0 for p in written)


# ---- Ceph as the origin ---------------------------------------------------------------


def test_ceph_origin_refuses_aria2() -> None:
    # aria2's seeder is a file in the origin namespace: it cannot start from Ceph.
    argv = ["--origin", "ceph", "--methods", "p2pcast,aria2", "--nodes", "2", "--quiet"]
    assert cluster_bench.main(argv) == 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_bench_ceph_origin(tmp_path: Path, ceph: Any) -> None:
    """The session's real Ceph as the origin: what radosgw and the OSDs say they served."""
    _require(ALL_TOOLS[:3])
    name = f"cc{os.getpid() % 100000}"
    argv = [
        "--origin", "ceph", "--ceph-instance", ceph.name, "--nodes", "2",
        "--rate", "200mbit", "--size", "16M", "--image-kind", "random",
        "--methods", "p2pcast,http,chain", "--timeout", "60",
    ]  # fmt: skip
    rc, result = _run(tmp_path, name, "198.19.251.0/24", argv)
    assert rc == 0, result["runs"]
    assert result["params"]["origin"] == "ceph"
    size = result["image"]["size"]
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"p2pcast", "http", "chain"}
    for method, r in runs.items():
        assert r["ok"] and r["verified"] == 2, r
        served = r["ceph"]
        # radosgw's own GET byte counter is the origin's count; the OSDs read it
        assert r["origin_bytes"] == served["rgw_get_bytes"]
        assert served["osd_read_bytes"] >= 0.99 * served["rgw_get_bytes"], (method, served)
        # the host's traffic into the bridge carried it (plus headers)
        assert r["origin_wire_bytes"] >= served["rgw_get_bytes"], (method, r)
    # the status quo: every node GETs the whole image object (within a few header bytes)
    assert runs["http"]["ceph"]["rgw_gets"] == 2
    assert runs["http"]["origin_bytes"] == pytest.approx(2 * size, abs=64)
    assert runs["chain"]["origin_bytes"] == pytest.approx(size, abs=64)
    # p2pcast: each (incompressible) chunk about once, spread over all three OSDs
    p2p = runs["p2pcast"]
    assert p2p["origin_bytes"] <= 1.05 * size
    assert p2p["origin_counted_bytes"] <= p2p["origin_bytes"]
    assert all(b > 0 for b in p2p["ceph"]["osd_read_bytes_per_osd"].values())
    assert len(p2p["ceph"]["osd_read_bytes_per_osd"]) == 3
    # Ceph's daemons are counted in the run's CPU
    assert p2p["cpu_seconds"] > 0
    assert not any(ns.startswith(f"{name}-") for ns in _namespaces())


def test_cluster_bench_network_faults(tmp_path: Path) -> None:
    """N=4, p2pcast: n3's link cut for 5 s at half its progress, the origin cut for
    5 s at 30 %, 2 % loss on n3's link, n3's daemon lying (a flipped byte in every
    4th chunk it serves); every node ends verified each time."""
    if shutil.which("nft") is None and not os.access("/usr/sbin/nft", os.X_OK):
        pytest.skip("needs nft (apt-get install nftables)")
    name = f"cn{os.getpid() % 100000}"
    argv = [
        "--nodes", "4", "--rate", "200mbit", "--size", "16M", "--chunk-size", "1M",
        "--methods", "p2pcast", "--scenarios", "fault-free,partition,origin-outage,loss,corrupt",
        "--timeout", "40",
    ]  # fmt: skip
    rc, result = _run(tmp_path, name, "198.19.252.0/24", argv)
    assert rc == 0, [(r["scenario"], r.get("ok"), r.get("error")) for r in result["runs"]]
    runs = {r["scenario"]: r for r in result["runs"]}
    assert list(runs) == ["fault-free", "partition", "origin-outage", "loss", "corrupt"]
    for scenario in ("partition", "origin-outage", "loss", "corrupt"):
        r = runs[scenario]
        assert r["ok"] and r["verified"] == 4, r
        assert r["fault_free_last_seconds"] == runs["fault-free"]["last_seconds"]
    part = runs["partition"]
    assert part["faulty_node"] == "n3" and part["faulty_seconds"] is not None
    assert part["cut_progress"] >= 0.5 and part["restored_at_seconds"] is not None
    # n3 cannot finish before its link is back
    assert part["faulty_seconds"] > part["restored_at_seconds"]
    outage = runs["origin-outage"]
    assert outage["faulty_node"] == "origin" and outage["others_total"] == 4
    assert outage["cut_progress"] >= 0.3 and outage["restored_at_seconds"] is not None
    assert runs["loss"]["loss_percent"] == 2.0 and runs["loss"]["faulty_seconds"] is not None
    # The liar was caught: it told lies, those it lied to banned it (and only it:
    # nobody else is among their dead peers), and it finished with a good copy itself.
    lying = runs["corrupt"]
    assert lying["faulty_node"] == "n3" and lying["faulty_seconds"] is not None
    assert 1 <= len(lying["banned_by"]) <= lying["lies"], lying
    assert "n3" not in lying["banned_by"]
    for node, fields in lying["per_node"].items():
        assert fields["dead_peers"] == (["n3"] if node in lying["banned_by"] else []), node
    assert not any(ns.startswith(f"{name}-") for ns in _namespaces())
    assert not cl.state_path(name).exists()
