"""Cluster benchmark: one image to N emulated nodes on shaped links, four ways.

    .venv/bin/python -m bench.cluster_bench --nodes 2,4,8 --rate 400mbit --size 256M \\
        --methods p2pcast,http,chain,aria2 --out bench/results/cluster.json [--plot] \\
        [--scenarios fault-free,straggler,kill] [--origin ceph]

For each N a cluster of N node namespaces and an origin namespace is built with
tools/cluster.py (every link shaped to --rate both ways, the origin's to
--origin-rate), the origin serves a directory origin with ``python -m
http.server``, and each method gets the same image onto every node:

- p2pcast: a daemon per node (origin http://ORIGIN:PORT), fetch asked on all at once;
- http: every node downloads the whole image file with curl (the status quo);
- chain: origin -> n1 -> ... -> nN with ``nc -l | tee | nc`` (netcat-openbsd);
- aria2: BitTorrent, opentracker and a seeding aria2c in the origin, an aria2c per
  node (pieces of --piece-length, each hash-checked by aria2), all nodes seeding
  until the last is done.

``--origin ceph`` puts the image in a real Ceph on the host instead (tools/ceph.py,
3 OSDs, S3 through radosgw; bench/ceph_origin.py), shaped to --origin-rate in total:
p2pcast reads its chunk objects, http (the status quo) has every node GET the whole
image object, the chain's head GETs it once; aria2 is not run (its seeder is a file in
the origin namespace). The origin bytes are then what radosgw says it sent (its perf
counters), with the OSDs' reads beside them.

``--scenarios`` (comma list, default ``fault-free``) adds robustness runs, each
on a cluster of its own, after the fault-free one of the same N. The faulty
node is always the node of rank N//2 (n2 of 2 or 3, n3 of 4 or 5, ...):

- ``straggler``: that node's link runs at a quarter of --rate, both ways;
- ``kill``: that node gets SIGKILL (every process in its namespace) when it holds
  half of the image, as seen by polling every 50 ms: p2pcast, its daemon's
  ``status`` (chunks held / chunks); http and chain, the size of its copy (curl
  and tee write in order); aria2, its aria2c's completedLength over JSON-RPC. The
  killed node is not verified; the survivors must all end with a verified copy,
  else the method is reported as failed for that scenario with how many did (a
  chain breaks at the dead hop: that is a result, not an error).
- ``partition``: that node's link is cut (``Cluster.cut``) for OUTAGE_S seconds
  once it holds half of the image, then restored; it must finish too.
- ``origin-outage``: the origin's link is cut for OUTAGE_S seconds once the
  node of rank N//2 holds 30 %, then restored; every node must finish.
- ``loss``: LOSS_PERCENT of the packets on that node's link are dropped, each
  way, for the whole run (nftables on the receiving ends: this kernel has no
  netem); it must finish too.
- ``corrupt``: that node runs bench/lying_daemon.py, a p2pcast daemon with the
  cluster's credentials that flips one byte in every 4th chunk it serves; the
  others must catch each lie by hash, ban the liar and fetch the chunk again.
  The record counts the lies (the liar's log) and which nodes banned it (their
  RESULT's dead_peers); the liar itself must finish too (it downloads honestly).
  partition, origin-outage and corrupt are run for p2pcast only (the others have
  no progress watcher for the first two yet, and no lying variant).

For these the other nodes' first/median/last times are reported apart from the
faulty node's own (the straggler's time, or when the kill came), and the others'
last time over the fault-free run's last time for the same method and N (issue
3 asks for <= 1.3); left out when fault-free was not run. ``--plot`` then also
writes OUT_faults.png.

Every copy is checked against the image's sha256 by this process, after the
timed window. Reported per method and N: time to the first, median and last
node and each over the floor S/B (S the image size, B the link rate in bytes/s),
bytes the origin served (as the method counts them, and on the origin's wire),
CPU seconds of everything in the namespaces and the machine's busy share.
Needs root, iproute2, curl and netcat-openbsd (and aria2, opentracker for aria2).
Everything it starts is stopped by PID and the cluster is taken down, also on
errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cluster_methods as cm
from bench.ceph_origin import CephOrigin
from p2pcast.cli import parse_size
from p2pcast.demo import make_image, stop_processes
from p2pcast.hashing import file_sha256
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from tools.cluster import Cluster, format_rate, parse_rate

HTTP_PORT = 8080
IMAGE_REF = ImageRef("bench", "latest")
DEFAULT_NAME = "cbench"
DEFAULT_SUBNET = "198.18.9.0/24"
SCENARIOS = ("fault-free", "straggler", "kill", "partition", "origin-outage", "loss", "corrupt")
#: Scenarios whose fault only p2pcast's runner carries out (a progress watcher
#: that cuts a link, a lying daemon); the other methods are not run in them.
OUTAGE_SCENARIOS = ("partition", "origin-outage")
P2PCAST_ONLY_SCENARIOS = (*OUTAGE_SCENARIOS, "corrupt")
#: partition, origin-outage: how long the link stays cut (s). Longer than TCP's
#: first retransmission timeouts (0.2, 0.4, 0.8, 1.6 s), short of giving up.
OUTAGE_S = 5.0
#: The partition comes when the faulty node holds this fraction of the image.
PARTITION_AT = 0.5
#: The origin goes away at this fraction of the broadcast (as the faulty node
#: sees it): early, while most chunks are still only at the origin.
ORIGIN_OUTAGE_AT = 0.3
#: loss: the share of packets lost on the faulty node's link, each direction.
LOSS_PERCENT = 2.0
ORIGINS = ("http", "ceph")
#: What can start from Ceph: aria2's seeder holds the file in the origin namespace.
CEPH_METHODS = ("p2pcast", "http", "chain")
#: The straggler's link: a quarter of everyone else's.
STRAGGLER_DIVISOR = 4
#: The kill comes when the victim holds this fraction of the image.
KILL_AT = 0.5
#: Issue 3: the other nodes finish within this factor of their fault-free time.
FAULT_TARGET = 1.3
MACHINE_NOTE = (
    "All namespaces share this machine's CPUs: N daemons/relays, the origin's HTTP "
    "server and the kernel's veth/bridge/htb work compete for the same cores, so "
    "machine_busy_pct near 100 means the run was CPU-bound, not link-bound."
)


# ---- the image ----------------------------------------------------------------------


def make_random_image(path: Path, size: int, seed: int = 7) -> None:
    """A tar of ~SIZE bytes of incompressible data (p2pcast then ships S bytes too)."""
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        written, n = 0, 0
        while written < size:
            member = min(4 << 20, size - written)
            info = tarfile.TarInfo(f"data/blob{n:05d}")
            info.size = member
            tar.addfile(info, io.BytesIO(rng.randbytes(member)))
            written += member + 512
            n += 1


def prepare_image(work: Path, size: int, kind: str, chunk_size: int | None) -> dict[str, Any]:
    """Generate the image, push it to WORK/origin, put the raw file there too."""
    image = work / "image.tar"
    (make_image if kind == "demo" else make_random_image)(image, size)
    origin_dir = work / "origin"

    async def publish() -> Any:
        async with DirectoryOrigin(str(origin_dir)) as origin:
            return (await push(str(image), origin, IMAGE_REF, chunk_size=chunk_size)).manifest

    m = asyncio.run(publish())
    raw = origin_dir / cm.RAW_NAME
    raw.parent.mkdir(parents=True, exist_ok=True)
    os.link(image, raw)
    return {
        "path": str(image),
        "origin_dir": str(origin_dir),
        "kind": kind,
        "size": m.size,
        "stored": m.stored_total,
        "chunks": m.chunk_count,
        "chunk_size": m.chunk_size,
        "sha256": m.sha256.hex(),
    }


# ---- one N ------------------------------------------------------------------------


def _wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _verify(paths: dict[str, str], want: str) -> dict[str, bool]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        got = dict(zip(paths, pool.map(file_sha256, paths.values()), strict=True))
    return {node: digest == want for node, digest in got.items()}


def faulty_node(n: int) -> str:
    """The faulty node of an N-node cluster: rank N//2 (ranks from 0), a middle one,
    so that it has neighbours on both sides in a chain and a ring."""
    return f"n{n // 2 + 1}"


def _by_rank(nodes: Any) -> list[str]:
    return sorted(nodes, key=lambda s: int(s[1:]))


def split_faulty(
    n: int, seconds: dict[str, float], ok: dict[str, bool], scenario: str, faulty: str
) -> dict[str, Any]:
    """The fault fields of a record: the other nodes' first/median/last over those
    with a verified copy, how many of them there are, and the faulty node's own time
    (a straggler's, if verified; a killed node has none)."""
    others = [f"n{i}" for i in range(1, n + 1) if f"n{i}" != faulty]
    done = sorted(seconds[node] for node in others if ok.get(node) and node in seconds)
    complete = len(done) == len(others)
    # The faulty node must finish too, unless it was killed (or is the origin).
    must_finish = scenario in ("straggler", "partition", "loss", "corrupt")
    own = seconds.get(faulty) if must_finish and ok.get(faulty) else None

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "others_total": len(others),
        "others_completed": len(done),
        "others_first_seconds": r(done[0]) if done else None,
        "others_median_seconds": r(statistics.median(done)) if done else None,
        "others_last_seconds": r(done[-1]) if complete and done else None,
        "faulty_seconds": r(own),
        "ok": complete and (not must_finish or own is not None),
    }


def fault_free_last(records: list[dict[str, Any]], method: str, n: int) -> float | None:
    """The fault-free last-node time of METHOD at N among RECORDS (the median over
    repeats that succeeded), or None if there is none to compare with."""
    lasts = [
        r["last_seconds"]
        for r in records
        if r.get("scenario", "fault-free") == "fault-free"
        and r["method"] == method
        and r["nodes"] == n
        and r.get("ok")
        and "error" not in r
    ]
    return round(statistics.median(lasts), 3) if lasts else None


def summarize(
    method: str, n: int, repeat: int, run: cm.MethodRun, ok: dict[str, bool], image: dict[str, Any],
    floor: float, wire: int, fault: cm.Fault | None = None, fault_free: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One result record. Fault-free: times over every node, as before faults existed.
    With a FAULT, the general times are over the nodes with a verified copy (a killed
    node has none) and the others/faulty fields are added; FAULT_FREE is the fault-free
    last time of the same method and N, for the others' ratio."""
    timed = run.seconds if fault is None else {k: v for k, v in run.seconds.items() if ok.get(k)}
    times = sorted(timed.values())
    # Only a kill can leave no node done without raising: then the times are None.
    first, median, last = (times[0], statistics.median(times), times[-1]) if times else (None,) * 3

    def r(value: float | None, scale: float = 1.0) -> float | None:
        return None if value is None else round(value / scale, 3)

    size = image["size"]
    nodes = {
        node: {"seconds": round(run.seconds[node], 4), "sha256_ok": ok[node]}
        | run.extra.get("nodes", {}).get(node, {})
        for node in _by_rank(run.seconds)
    }
    if fault is not None:  # every node listed, the faulty one marked
        incomplete = run.extra.get("incomplete", {})
        for node in {f"n{i}" for i in range(1, n + 1)} - set(nodes):
            nodes[node] = {"seconds": None, "sha256_ok": False}
            if node != fault.node and node in incomplete:
                nodes[node]["incomplete"] = incomplete[node]
        if fault.node in nodes:  # not the origin
            marks = {"kill": "killed", "straggler": "straggler"}
            nodes[fault.node][marks.get(fault.scenario, fault.scenario)] = True
        nodes = {node: nodes[node] for node in _by_rank(nodes)}
    record: dict[str, Any] = {
        "method": method,
        "nodes": n,
        "repeat": repeat,
        "scenario": "fault-free" if fault is None else fault.scenario,
        "faulty_node": None if fault is None else fault.node,
        "ok": all(ok.values()),
        "verified": sum(ok.values()),
        "first_seconds": r(first),
        "median_seconds": r(median),
        "last_seconds": r(last),
        "first_ratio": r(first, floor),
        "median_ratio": r(median, floor),
        "last_ratio": r(last, floor),
        "wall_seconds": round(run.wall_seconds, 3),
        "origin_bytes": run.origin_bytes,
        "origin_ratio": None if run.origin_bytes is None else round(run.origin_bytes / size, 3),
        "origin_wire_bytes": wire,
        "origin_wire_ratio": round(wire / size, 3),
        **run.extra.get("cpu", {}),
        "per_node": nodes,
    }
    if "stored_bytes" in run.extra:  # p2pcast ships stored (zstd where it pays) bytes
        record["stored_bytes"] = run.extra["stored_bytes"]
        stored_floor = floor * run.extra["stored_bytes"] / size
        record["last_ratio_stored"] = r(last, stored_floor)
    if "piece_length" in run.extra:  # aria2
        record["piece_length"] = run.extra["piece_length"]
    if "ceph" in run.extra:  # Ceph's own counters: radosgw GETs, OSD reads
        record["ceph"] = run.extra["ceph"]
        record["origin_counted_bytes"] = run.extra["origin_counted_bytes"]
    if fault is not None:
        record |= fault_fields(n, run, ok, fault, fault_free)
    return record


def fault_fields(
    n: int, run: cm.MethodRun, ok: dict[str, bool], fault: cm.Fault, fault_free: float | None
) -> dict[str, Any]:
    """What a fault record adds: the others vs the faulty node, the ratio to the
    fault-free run, what the kill did, and why it failed if it did."""
    fields = split_faulty(n, run.seconds, ok, fault.scenario, fault.node)
    if fault.scenario == "straggler":
        fields["faulty_rate_divisor"] = STRAGGLER_DIVISOR
    if fault.scenario == "kill":
        fields |= {"kill_at": fault.at, **run.extra.get("kill", {})}
    if fault.scenario in OUTAGE_SCENARIOS:
        fields |= {"cut_at": fault.at, "cut_seconds": fault.duration}
        fields |= run.extra.get("outage", {})
    if fault.scenario == "loss":
        fields["loss_percent"] = LOSS_PERCENT
    if fault.scenario == "corrupt":
        fields |= run.extra.get("corrupt", {})
    if fault_free is not None:
        last = fields["others_last_seconds"]
        fields["fault_free_last_seconds"] = fault_free
        fields["others_last_vs_fault_free"] = None if last is None else round(last / fault_free, 3)
    if not fields["ok"]:
        who = "survivors" if fault.scenario == "kill" else "other nodes"
        fields["failure"] = (
            f"{fields['others_completed']} of {fields['others_total']} {who} completed "
            "with a verified copy"
        )
        if fault.scenario != "kill" and fields["faulty_seconds"] is None and fault.node != "origin":
            fields["failure"] += f"; the faulty node {fault.node} did not"
    return fields


def _fault(scenario: str, n: int) -> cm.Fault | None:
    """The fault of SCENARIO on an N-node cluster (None for fault-free)."""
    node = faulty_node(n)
    if scenario == "fault-free":
        return None
    if scenario == "partition":
        return cm.Fault(scenario, node, PARTITION_AT, OUTAGE_S)
    if scenario == "origin-outage":  # timed by the faulty node's progress
        return cm.Fault(scenario, "origin", ORIGIN_OUTAGE_AT, OUTAGE_S, watch=node)
    return cm.Fault(scenario, node, KILL_AT)


def run_n(
    args: argparse.Namespace,
    n: int,
    image: dict[str, Any],
    work: Path,
    scenario: str = "fault-free",
    earlier: list[dict[str, Any]] | None = None,
    ceph: CephOrigin | None = None,
) -> list[dict[str, Any]]:
    """Every method (and repeat) at N in SCENARIO, on a cluster of its own; EARLIER
    records of this invocation give the fault-free times the faults compare with.
    With CEPH the origin is that Ceph on the host, at --origin-rate in total."""
    records: list[dict[str, Any]] = []
    floor = image["size"] / (parse_rate(args.rate) / 8)
    say = print if not args.quiet else (lambda *a, **k: None)
    fault = _fault(scenario, n)
    rates: dict[str, int | str] = {}
    if fault is not None and scenario == "straggler":
        rates[fault.node] = parse_rate(args.rate) // STRAGGLER_DIVISOR
    tag = "" if fault is None else f"-{scenario}"
    with Cluster.up(
        n, args.rate, args.origin_rate, name=args.name, subnet=args.subnet, rates=rates
    ) as cluster:
        if fault is not None and scenario == "loss":
            cluster.set_loss(fault.node, LOSS_PERCENT)
        origin_ip = cluster.origin_address
        server = None
        if ceph is not None:
            ceph.attach(cluster, parse_rate(args.origin_rate or args.rate))
        else:
            with open(work / f"http-server-{n}{tag}.log", "wb") as log:
                server = cluster.popen(
                    "origin",
                    [sys.executable, "-m", "http.server", "--bind", origin_ip, str(HTTP_PORT),
                     "--directory", image["origin_dir"]],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )  # fmt: skip
        try:
            if server is not None:
                _wait_port(origin_ip, HTTP_PORT)
            for repeat in range(args.repeat):
                for method in args.methods:
                    if scenario in P2PCAST_ONLY_SCENARIOS and method != "p2pcast":
                        continue  # only p2pcast's runner has these faults yet
                    mwork = work / "runs" / f"{method}-n{n}{tag}-r{repeat}"
                    mwork.mkdir(parents=True)
                    setup = cm.Setup(
                        cluster=cluster,
                        origin_url=(
                            ceph.url if ceph is not None else f"http://{origin_ip}:{HTTP_PORT}"
                        ),
                        origin_dir=Path(image["origin_dir"]),
                        image=Path(image["path"]),
                        image_ref=str(IMAGE_REF),
                        size=image["size"],
                        work=mwork,
                        timeout=args.timeout,
                        piece_length=parse_size(args.piece_length),
                        verbose=args.keep_logs is not None,
                        fault=fault,
                        ceph=ceph,
                    )
                    time.sleep(args.settle)
                    wire0 = _origin_wire(cluster, ceph)
                    counters0 = None if ceph is None else ceph.counters()
                    try:
                        meter = cm.CpuMeter(cluster, None if ceph is None else ceph.pids)
                        run = cm.METHODS[method](setup, meter)
                        wire = _origin_wire(cluster, ceph) - wire0
                        if ceph is not None and counters0 is not None:
                            # What Ceph itself says it served replaces the method's count.
                            served = ceph.counters().minus(counters0)
                            run.extra["ceph"] = served
                            run.extra["origin_counted_bytes"] = run.origin_bytes
                            run.origin_bytes = served["rgw_get_bytes"]
                        if setup.victim is not None:  # the killed node is not verified
                            run.seconds.pop(setup.victim, None)
                            run.paths.pop(setup.victim, None)
                        ok = _verify(run.paths, image["sha256"])
                        baseline = fault_free_last((earlier or []) + records, method, n)
                        rec = summarize(
                            method, n, repeat, run, ok, image, floor, wire, fault, baseline
                        )
                    except Exception as exc:  # one failed method does not end the run
                        rec = {"method": method, "nodes": n, "repeat": repeat,
                               "scenario": scenario,
                               "faulty_node": None if fault is None else fault.node,
                               "ok": False, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                    finally:
                        if args.keep_logs is not None:
                            _keep_logs(mwork, Path(args.keep_logs) / mwork.name)
                        shutil.rmtree(mwork, ignore_errors=True)
                    records.append(rec)
                    say(_row(rec), flush=True)
        finally:
            if server is not None:
                stop_processes([server])
    return records


def _origin_wire(cluster: Cluster, ceph: CephOrigin | None) -> int:
    """Bytes the origin has put on the wire: the origin namespace's link, or for a
    Ceph on the host, what the host sent into the bridge."""
    return cluster.host_tx_bytes() if ceph is not None else cm.origin_tx_bytes(cluster)


def _keep_logs(work: Path, dest: Path) -> None:
    """Copy a run's logs (daemons, tools) out of the scratch space before it goes."""
    for log in work.rglob("*.log"):
        target = dest / log.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, target)


# ---- output -------------------------------------------------------------------------

HEADER = (
    f"{'method':8s} {'N':>3s} {'first':>7s} {'median':>7s} {'last':>7s} {'last/fl':>7s} "
    f"{'origin':>7s} {'wire':>6s} {'CPU s':>7s} {'cores':>5s} {'busy%':>6s}  sha256"
)


FAULT_HEADER = (
    f"{'method':8s} {'N':>3s} {'scenario':9s} {'faulty':>6s} {'first':>7s} {'median':>7s} "
    f"{'last':>7s} {'vs ff':>6s} {'own/kill':>8s} {'busy%':>6s}  others verified\n"
    "  (first/median/last: the other nodes; vs ff: their last over the fault-free last;\n"
    "   own/kill: the straggler's own time, or when the kill came)"
)


def header(scenario: str) -> str:
    return HEADER if scenario == "fault-free" else FAULT_HEADER


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        scenario = "" if r.get("scenario", "fault-free") == "fault-free" else f" {r['scenario']}"
        return f"{r['method']:8s} {r['nodes']:3d}{scenario}  FAILED: {r['error']}"
    if r.get("scenario", "fault-free") != "fault-free":
        return _fault_row(r)
    origin = "?" if r["origin_ratio"] is None else f"{r['origin_ratio']:.2f}x"
    return (
        f"{r['method']:8s} {r['nodes']:3d} {r['first_seconds']:7.2f} {r['median_seconds']:7.2f} "
        f"{r['last_seconds']:7.2f} {r['last_ratio']:7.2f} {origin:>7s} "
        f"{r['origin_wire_ratio']:5.2f}x {r['cpu_seconds']:7.1f} {r['cpu_cores']:5.2f} "
        f"{r['machine_busy_pct']:6.1f}  {r['verified']}/{r['nodes']} ok"
    )


def _fault_row(r: dict[str, Any]) -> str:
    def f(value: float | None, width: int = 7, suffix: str = "") -> str:
        return f"{'-':>{width}s}" if value is None else f"{value:{width - len(suffix)}.2f}{suffix}"

    own = r["faulty_seconds"] if r["scenario"] == "straggler" else r.get("killed_at_seconds")
    ratio = r.get("others_last_vs_fault_free")
    verdict = "ok" if r["ok"] else f"FAILED ({r['failure']})"
    return (
        f"{r['method']:8s} {r['nodes']:3d} {r['scenario']:9s} {r['faulty_node']:>6s} "
        f"{f(r['others_first_seconds'])} {f(r['others_median_seconds'])} "
        f"{f(r['others_last_seconds'])} {f(ratio, 6, 'x')} {f(own, 8)} "
        f"{r['machine_busy_pct']:6.1f}  {r['others_completed']}/{r['others_total']} {verdict}"
    )


def _scenario(r: dict[str, Any]) -> str:
    """A record's scenario: results from before --scenarios existed are fault-free."""
    return str(r.get("scenario", "fault-free"))


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """time vs N (last node, band first..last, the floor) and last/floor vs N, per method,
    from the fault-free runs; OUT_faults.png too if there are others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if any(_scenario(r) != "fault-free" for r in result["runs"]):
        written.append(plot_faults(result, out))
    runs = [r for r in result["runs"] if "error" not in r and _scenario(r) == "fault-free"]
    if not runs:
        return written
    methods = list(dict.fromkeys(r["method"] for r in runs))
    floor = result["floor_seconds"]
    p = result["params"]
    title = f"{p['size_human']} image, links {p['rate']} (floor S/B = {floor:.2f} s)"
    if p.get("origin") == "ceph":
        title += ", origin: Ceph S3"
    for kind in ("time", "ratio"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["nodes"])
            ns = sorted({r["nodes"] for r in mine})
            scale = 1.0 if kind == "time" else floor

            def pick(
                key: str, ns: list[int] = ns, mine: list[dict[str, Any]] = mine
            ) -> list[float]:
                return [statistics.median(r[key] for r in mine if r["nodes"] == k) for k in ns]

            last = [v / scale for v in pick("last_seconds")]
            first = [v / scale for v in pick("first_seconds")]
            (line,) = ax.plot(ns, last, marker="o", label=f"{method} (last node)")
            ax.fill_between(ns, first, last, color=line.get_color(), alpha=0.15)
        all_ns = sorted({r["nodes"] for r in runs})
        ax.plot(all_ns, [floor if kind == "time" else 1.0] * len(all_ns), "k--", label="floor S/B")
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ns, [str(k) for k in all_ns])
        ax.set_xlabel("nodes N")
        ax.set_ylabel("seconds to node" if kind == "time" else "time / floor S/B")
        ax.set_title(title + ("" if kind == "time" else ": ratio to floor"), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_faults(result: dict[str, Any], out: Path) -> Path:
    """OUT_faults.png: per method, the other nodes' last time over the fault-free last
    time, one group of bars per (scenario, N), with the 1.3 x target. A method that
    failed a scenario gets a hatched bar to the top saying how many others finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if _scenario(r) != "fault-free"]
    groups = sorted({(SCENARIOS.index(_scenario(r)), r["nodes"]) for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    ratios = [r["others_last_vs_fault_free"] for r in runs if r.get("others_last_vs_fault_free")]
    top = max([FAULT_TARGET * 1.2, *(v * 1.1 for v in ratios)])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(methods)) / 2), 4.5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        color = f"C{i}"
        for j, (s_index, n) in enumerate(groups):
            mine = [
                r for r in runs
                if r["method"] == method and r["nodes"] == n and _scenario(r) == SCENARIOS[s_index]
            ]  # fmt: skip
            if not mine:
                continue
            x = j - 0.4 + width * (i + 0.5)
            good = [r["others_last_vs_fault_free"] for r in mine if r.get("ok")]
            if len(good) == len(mine) and all(v is not None for v in good):
                value = statistics.median(good)
                ax.bar(x, value, width, color=color, label=method if j == 0 else None)
                ax.text(x, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
                continue
            if any("error" in r for r in mine):
                note = "error"
            elif not all(r.get("ok") for r in mine):
                bad = next(r for r in mine if not r.get("ok"))
                note = f"failed\n{bad['others_completed']}/{bad['others_total']}"
            else:
                note = "no\nfault-free"
            ax.bar(x, top * 0.9, width, color=color, alpha=0.25, hatch="//",
                   label=method if j == 0 else None)  # fmt: skip
            ax.text(x, top * 0.45, note, ha="center", va="center", fontsize=7)
    ax.axhline(FAULT_TARGET, color="red", linestyle="--", label=f"target {FAULT_TARGET} x")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [f"{SCENARIOS[s]}\nN={n}" for s, n in groups])
    ax.set_ylim(0, top)
    ax.set_ylabel("others' last time / fault-free last time")
    p = result["params"]
    ax.set_title(
        f"{p['size_human']} image, links {p['rate']}; the faulty node: rank N//2\n"
        f"(straggler: 1/{STRAGGLER_DIVISOR} of the rate; kill: at {KILL_AT:.0%} of its progress)",
        fontsize=9,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_name(f"{out.stem}_faults.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def healthy(r: dict[str, Any]) -> bool:
    """Whether a record is a measurement, not a breakage: ok, or a kill that the
    method did not survive (a result; the chain is expected to give one)."""
    return bool(r.get("ok")) or ("error" not in r and _scenario(r) == "kill")


# ---- main ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.cluster_bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--nodes", default="2,4,8", help="node counts, e.g. 2,4,8,16")
    ap.add_argument("--rate", default="400mbit", help="every node's link, each way")
    ap.add_argument("--origin-rate", default=None, help="the origin's link (default --rate)")
    ap.add_argument("--size", default="256M", help="image size (default %(default)s)")
    ap.add_argument(
        "--image-kind", choices=("demo", "random"), default="demo",
        help="demo: p2pcast.demo.make_image (1/4 compressible); random: incompressible",
    )  # fmt: skip
    ap.add_argument(
        "--chunk-size", default="auto", help="p2pcast's chunks (default: as push chooses)"
    )
    ap.add_argument("--piece-length", default="1M", help="aria2: the torrent's piece length")
    ap.add_argument("--methods", default="p2pcast,http,chain")
    ap.add_argument(
        "--origin", choices=ORIGINS, default="http",
        help="http: a directory served over HTTP from the origin namespace; ceph: a real "
        "Ceph on the host (tools/ceph.py), S3 through radosgw, shaped to --origin-rate "
        f"(methods {', '.join(CEPH_METHODS)})",
    )  # fmt: skip
    ap.add_argument(
        "--ceph-instance", default=None, metavar="NAME",
        help="--origin ceph: use this running tools/ceph.py instance (its 3 OSDs, left "
        "running) instead of starting one for the run",
    )  # fmt: skip
    ap.add_argument(
        "--scenarios", default="fault-free",
        help="comma list of fault-free, straggler (node of rank N//2 at a quarter of --rate), "
        "kill (that node SIGKILLed at 50%% of its progress), partition (its link cut 5 s at "
        "50%%), origin-outage (the origin's link cut 5 s at 30%%), loss (2%% loss on its "
        "link), corrupt (that node's daemon flips a byte in every 4th chunk it serves); "
        "default %(default)s",
    )  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default="bench/results/cluster.json")
    ap.add_argument(
        "--plot", action="store_true",
        help="also write OUT_time.png, OUT_ratio.png (and OUT_faults.png with faults)",
    )  # fmt: skip
    ap.add_argument("--replot", action="store_true", help="only plot an existing --out file")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per transfer")
    ap.add_argument("--settle", type=float, default=1.0, help="idle seconds before each run")
    ap.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default %(default)s)")
    ap.add_argument("--subnet", default=DEFAULT_SUBNET)
    ap.add_argument(
        "--workdir",
        default=None,
        help="scratch (default: a huge-page tmpfs, mounted for the run)",
    )
    ap.add_argument(
        "--keep-logs",
        default=None,
        metavar="DIR",
        help="copy every run's logs here (p2pcast daemons log verbosely)",
    )
    ap.add_argument("--quiet", action="store_true")
    return ap


#: The nodes' caches and the origin's files live on a tmpfs of their own with
#: transparent huge pages. This VM hands freed memory back to its host (free
#: page reporting), so every 4 KiB page an image lands on costs a host fault
#: that shows up as guest CPU in whichever process writes it: writing 256 MiB
#: into /dev/shm measured 0.6-2 GB/s here, into a huge-page tmpfs 20 GB/s once
#: warm. With /dev/shm, that copy was half of the machine's CPU at N=16; it is
#: the same for every method, but it made the benchmark CPU-bound.
SCRATCH_MOUNT_OPTIONS = "huge=always,mode=0755"


def _scratch(needed: int) -> tuple[Path, bool]:
    """A scratch directory: (path, True) if it is a tmpfs we mounted for this run."""
    path = Path(tempfile.mkdtemp(prefix="p2pcast-cbench-"))
    mount = shutil.which("mount")
    if mount is not None:
        options = f"size={needed},{SCRATCH_MOUNT_OPTIONS}"
        argv = [mount, "-t", "tmpfs", "-o", options, "p2pcast-cbench", str(path)]
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return path, True
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > needed:
            path.rmdir()
            return Path(tempfile.mkdtemp(prefix="p2pcast-cbench-", dir=shm)), False
    return path, False


def _drop_scratch(path: Path, mounted: bool) -> None:
    if mounted:
        umount = shutil.which("umount") or "umount"
        subprocess.run([umount, str(path)], capture_output=True, check=False)
        path.rmdir()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _sigterm(_sig: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks: daemons, cluster


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.replot:
        for path in plot(json.loads(out.read_text()), out):
            print(f"wrote {path}")
        return 0
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in args.methods if m not in cm.METHODS]:
        print(f"cluster_bench: unknown methods {bad} (have {sorted(cm.METHODS)})", file=sys.stderr)
        return 2
    if args.origin == "ceph" and (bad := [m for m in args.methods if m not in CEPH_METHODS]):
        print(f"cluster_bench: {bad} cannot start from Ceph (have {CEPH_METHODS})", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.nodes.split(",")]
    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    bad = [x for x in scenarios if x not in SCENARIOS]
    if bad or not scenarios:
        print(
            f"cluster_bench: bad --scenarios {bad} (have {', '.join(SCENARIOS)})", file=sys.stderr
        )
        return 2
    # fault-free first, so that the faults have a time of the same invocation to compare with
    scenarios = [x for x in SCENARIOS if x in scenarios]
    if scenarios != ["fault-free"] and min(counts) < 2:
        print("cluster_bench: faults need N >= 2 (the others must exist)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    rate = parse_rate(args.rate)
    if os.geteuid() != 0:
        print("cluster_bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    if args.workdir:
        work, mounted = Path(args.workdir), False
        work.mkdir(parents=True, exist_ok=True)
    else:
        work, mounted = _scratch(size * (2 * max(counts) + 4))
    began = time.time()
    ceph: CephOrigin | None = None
    try:
        chunk = None if args.chunk_size == "auto" else parse_size(args.chunk_size)
        image = prepare_image(work, size, args.image_kind, chunk)
        if args.origin == "ceph":
            ceph = CephOrigin.up(args.ceph_instance)
            ceph.publish(Path(image["path"]), IMAGE_REF, image["chunk_size"])
        floor = image["size"] / (rate / 8)
        if not args.quiet:
            print(
                f"image {image['size']} B ({image['stored']} stored, {image['chunks']} chunks), "
                f"links {format_rate(rate)}, floor S/B = {floor:.2f} s",
                flush=True,
            )
        runs: list[dict[str, Any]] = []
        shown = None
        for n in counts:
            for scenario in scenarios:
                if not args.quiet and header(scenario) != shown:
                    shown = header(scenario)
                    print(shown, flush=True)
                runs += run_n(args, n, image, work, scenario, runs, ceph)
    finally:
        if ceph is not None:
            ceph.down()
        if args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _drop_scratch(work, mounted)
    origin_rate = parse_rate(args.origin_rate) if args.origin_rate else rate
    result = {
        "benchmark": "cluster",
        "started": began,
        "params": {
            "nodes": counts,
            "rate": format_rate(rate),
            "rate_bit": rate,
            "origin_rate_bit": origin_rate,
            "size": size,
            "size_human": args.size,
            "origin": args.origin,
            "methods": args.methods,
            "scenarios": scenarios,
            "repeat": args.repeat,
            "image_kind": args.image_kind,
            "chunk_size": image["chunk_size"],
            "piece_length": parse_size(args.piece_length),
        },
        "image": {k: v for k, v in image.items() if k not in ("path", "origin_dir")},
        "floor_seconds": round(floor, 4),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "mem_total_kib": _meminfo_total(),
            "note": MACHINE_NOTE,
        },
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(f"wrote {out}")
    if args.plot:
        for path in plot(result, out):
            print(f"wrote {path}")
    return 0 if all(healthy(r) for r in runs) else 1


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
