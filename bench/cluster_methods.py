"""The four ways of getting one image onto N emulated nodes (bench/cluster_bench.py).

Each method runs inside a live ``tools.cluster.Cluster`` whose origin namespace
already serves ``ORIGIN_DIR`` over HTTP (``python -m http.server``), and returns
a ``MethodRun``: per-node completion times and file paths, the start/end
timestamps, and what it knows about the bytes the origin served. CPU is
measured around the timed window by ``CpuMeter``.

- ``p2pcast``: one daemon per node namespace, fetch requested on every node at once;
- ``http``: every node downloads the whole image file with curl (the status quo);
- ``chain``: origin -> n1 -> ... -> nN, each hop ``nc -l | tee FILE | nc NEXT``;
- ``aria2``: BitTorrent, opentracker and a seeding aria2c in the origin, aria2c per node.

Every process a method starts is stopped and reaped by PID before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pcast import control
from p2pcast.errors import DaemonUnavailable
from tools.cluster import Cluster, netns_pids

#: Ports inside the namespaces (each namespace has its own port space).
P2PCAST_PORT = 7086
CHAIN_PORT = 9000

#: Seconds for daemons to answer their control sockets / a chain hop to listen.
START_TIMEOUT = 30.0

#: The raw image file's name in the origin directory (for http and chain).
RAW_NAME = "raw/image.tar"


@dataclasses.dataclass
class MethodRun:
    """What one method did in one timed window."""

    seconds: dict[str, float]  # node -> seconds from the common start to its copy complete
    paths: dict[str, str]  # node -> its copy
    wall_seconds: float  # start of the window to the last node (and every process) done
    origin_bytes: int | None  # bytes the origin served, as the method counts them
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # per node and global


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every method needs: the cluster, the origin's URL, the image and scratch space."""

    cluster: Cluster
    origin_url: str  # http://ORIGIN_IP:PORT
    origin_dir: Path
    image: Path  # the raw image file (also at origin_dir / RAW_NAME)
    image_ref: str  # name:tag pushed to the origin
    size: int
    work: Path  # scratch for this method (per-node copies, daemon state)
    timeout: float  # seconds for the whole transfer
    piece_length: int = 1 << 20  # aria2: the torrent's piece length
    verbose: bool = False  # daemons log what they do (for --keep-logs)


# ---- CPU ----------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _proc_ticks(pid: int) -> tuple[int, int] | None:
    """(start time, utime+stime+cutime+cstime) of PID in clock ticks, or None."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = data[data.rindex(")") + 2 :].split()
    return int(f[19]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already in user/nice
    return total - idle, total


class CpuMeter:
    """CPU used by everything in the cluster's namespaces over a window.

    Live processes are read from /proc (utime+stime plus their reaped children's
    times), processes started and reaped by this benchmark in the window come from
    os.times()'s children fields, and the machine's busy share from /proc/stat
    (that one also sees the kernel's softirq work for veths, bridge and shapers,
    which no process is charged for)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def _ns(self) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for host in self.cluster.hosts.values():
            for pid in netns_pids(host.namespace):
                if (ticks := _proc_ticks(pid)) is not None:
                    out[pid] = ticks
        return out

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.times0 = os.times()
        self.machine0 = _machine_ticks()
        self.ns0 = self._ns()

    def stop(self) -> dict[str, float]:
        ns1 = self._ns()
        machine1 = _machine_ticks()
        times1 = os.times()
        wall = max(time.monotonic() - self.t0, 1e-9)
        live = 0
        for pid, (start, ticks) in ns1.items():
            before = self.ns0.get(pid)
            live += ticks - before[1] if before and before[0] == start else ticks
        reaped = (times1.children_user + times1.children_system) - (
            self.times0.children_user + self.times0.children_system
        )
        busy = machine1[0] - self.machine0[0]
        total = max(machine1[1] - self.machine0[1], 1)
        cpu = live / TICK + reaped
        bench = (times1.user + times1.system) - (self.times0.user + self.times0.system)
        return {
            "cpu_seconds": round(cpu, 3),
            "cpu_cores": round(cpu / wall, 3),
            "bench_cpu_seconds": round(bench, 3),
            "machine_busy_pct": round(100.0 * busy / total, 1),
            "machine_cores_busy": round(busy / TICK / wall, 3),
            "meter_seconds": round(wall, 3),
        }


def origin_tx_bytes(cluster: Cluster) -> int:
    """Bytes sent so far by the origin's link (its eth0), headers included."""
    out = cluster.run(
        "origin", ["cat", "/sys/class/net/eth0/statistics/tx_bytes"], capture_output=True, text=True
    )
    return int(out.stdout.strip() or 0)


# ---- helpers ------------------------------------------------------------------------


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM, then SIGKILL after 10 s, each process we started (by PID); reap them."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_all(
    procs: dict[str, subprocess.Popen[Any]], t0: float, timeout: float
) -> dict[str, float]:
    """Wait for every process (one thread each, so each exit is timed as it happens);
    return node -> seconds from T0 (time.monotonic) to its exit. Raise on a failure."""
    ends: dict[str, float] = {}

    def wait(node: str, proc: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
            ends[node] = time.monotonic() - t0

    threads = [threading.Thread(target=wait, args=item, daemon=True) for item in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    late = sorted(set(procs) - set(ends))
    if late:
        _stop(list(procs.values()))
        raise TimeoutError(f"not done after {timeout:.0f} s: {', '.join(late)}")
    failed = {node: p.returncode for node, p in procs.items() if p.returncode != 0}
    if failed:
        raise RuntimeError(f"exit status != 0: {failed}")
    return ends


# ---- p2pcast ------------------------------------------------------------------------


def _control(work: Path, node: str) -> str:
    return str(work / node / "control.sock")


async def _ready(setup: Setup, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for node, proc in procs.items():
        while True:
            if proc.poll() is not None:
                log = (setup.work / node / "daemon.log").read_text()[-2000:]
                raise DaemonUnavailable(f"daemon {node} exited: {log}")
            try:
                await control.request(_control(setup.work, node), "ping")
                break
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


async def _broadcast(setup: Setup) -> tuple[float, dict[str, dict[str, Any]], dict[str, float]]:
    """Fetch on every node at once; (t0, node -> RESULT body, node -> seconds seen here)."""
    nodes = setup.cluster.nodes
    hostlist = f"n[1-{len(nodes)}]" if len(nodes) > 1 else nodes[0]
    seen: dict[str, float] = {}

    async def one(node: str, t0: float) -> dict[str, Any]:
        body = await control.request(
            _control(setup.work, node),
            "fetch",
            image=setup.image_ref,
            peers=hostlist,
            node=node,
            addresses=setup.cluster.addresses,
            job="cluster-bench",
        )
        seen[node] = time.monotonic() - t0
        return body

    t0 = time.monotonic()
    bodies = await asyncio.wait_for(
        asyncio.gather(*(one(node, t0) for node in nodes)), setup.timeout
    )
    return t0, dict(zip(nodes, bodies, strict=True)), seen


def run_p2pcast(setup: Setup, meter: CpuMeter, loop: str = "uvloop") -> MethodRun:
    """One p2pcast daemon per node (started first, not timed), then one broadcast."""
    cluster = setup.cluster
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for node, address in cluster.addresses.items():
            state = setup.work / node
            state.mkdir(parents=True, exist_ok=True)
            argv = [
                sys.executable, "-m", "p2pcast", "daemon",
                "--node", node, "--listen", address, "--port", str(P2PCAST_PORT),
                "--state-dir", str(state), "--control", _control(setup.work, node),
                "--origin", setup.origin_url, "--loop", loop,
            ] + (["--verbose"] if setup.verbose else [])  # fmt: skip
            with open(state / "daemon.log", "wb") as log:
                procs[node] = cluster.popen(
                    node, argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        asyncio.run(_ready(setup, procs))
        meter.start()
        t0, bodies, seen = asyncio.run(_broadcast(setup))
        wall = time.monotonic() - t0
        cpu = meter.stop()
    finally:
        _stop(list(procs.values()))
    keep = (
        "from_origin", "from_peers", "origin_bytes_read", "requests_sent", "busy_answers",
        "dead_peers", "state",
    )  # fmt: skip
    # The daemon's own clock starts when it has the manifest and has set the broadcast
    # up, so its "seconds" leaves out the manifest GET over the shaped link and the
    # request handling (0.1 s idle, ~2 s with 16 daemons on 2 cores). The node's time
    # is therefore taken here, from the common start to its RESULT, as for http and chain.
    per_node = {
        node: {k: body.get(k) for k in keep}
        | {
            "daemon_seconds": body.get("seconds"),
            "daemon_transfer_seconds": body.get("transfer_seconds"),
        }
        for node, body in bodies.items()
    }
    stored = int(next(iter(bodies.values()))["bytes_total"])
    return MethodRun(
        seconds=seen,
        paths={node: str(body["path"]) for node, body in bodies.items()},
        wall_seconds=wall,
        origin_bytes=sum(int(b["origin_bytes_read"]) for b in bodies.values()),
        extra={"cpu": cpu, "nodes": per_node, "stored_bytes": stored},
    )


# ---- http ---------------------------------------------------------------------------


def run_http(setup: Setup, meter: CpuMeter) -> MethodRun:
    """Every node downloads the whole image file from the origin at once (curl)."""
    cluster = setup.cluster
    url = f"{setup.origin_url}/{RAW_NAME}"
    paths = {node: str(setup.work / f"{node}.tar") for node in cluster.nodes}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        meter.start()
        t0 = time.monotonic()
        for node in cluster.nodes:
            argv = ["curl", "--silent", "--show-error", "--fail", "--output", paths[node], url]
            procs[node] = cluster.popen(node, argv, stdin=subprocess.DEVNULL)
        seconds = _wait_all(procs, t0, setup.timeout)
        wall = time.monotonic() - t0
        cpu = meter.stop()
    finally:
        _stop(list(procs.values()))
    return MethodRun(
        seconds=seconds,
        paths=paths,
        wall_seconds=wall,
        origin_bytes=setup.size * len(cluster.nodes),
        extra={"cpu": cpu},
    )


# ---- chain --------------------------------------------------------------------------


def _listening(cluster: Cluster, node: str, port: int) -> bool:
    out = cluster.run(node, ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def run_chain(setup: Setup, meter: CpuMeter) -> MethodRun:
    """origin -> n1 -> ... -> nN with netcat-openbsd: each hop `nc -l -d | tee FILE | nc -N
    NEXT`, the last `nc -l -d > FILE`. Receivers start from the tail; then the origin
    sends. A node's time is when its tee finished (a `date` stamp written after it)."""
    cluster = setup.cluster
    nc = shutil.which("nc")
    if nc is None:
        raise RuntimeError("the chain needs netcat-openbsd: apt-get install netcat-openbsd")
    nodes = cluster.nodes
    addr = cluster.addresses
    paths = {node: str(setup.work / f"{node}.tar") for node in nodes}
    stamps = {node: str(setup.work / f"{node}.done") for node in nodes}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for i in range(len(nodes) - 1, -1, -1):
            node = nodes[i]
            listen = f"{nc} -l -d {addr[node]} {CHAIN_PORT}"
            if i == len(nodes) - 1:
                script = f"{listen} > {paths[node]}; date +%s.%N > {stamps[node]}"
            else:
                nxt = addr[nodes[i + 1]]
                script = (
                    f"({listen} | tee {paths[node]}; date +%s.%N > {stamps[node]})"
                    f" | {nc} -N {nxt} {CHAIN_PORT}"
                )
            procs[node] = cluster.popen(node, ["sh", "-c", script], stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT
            while not _listening(cluster, node, CHAIN_PORT):
                if procs[node].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chain hop {node} is not listening")
                time.sleep(0.01)
        meter.start()
        t0 = time.monotonic()
        t0_wall = time.time()
        send = f"{nc} -N {addr[nodes[0]]} {CHAIN_PORT} < {setup.image}"
        procs["origin"] = cluster.popen("origin", ["sh", "-c", send], stdin=subprocess.DEVNULL)
        _wait_all(procs, t0, setup.timeout)
        wall = time.monotonic() - t0
        cpu = meter.stop()
    finally:
        _stop(list(procs.values()))
    seconds = {node: float(Path(stamps[node]).read_text()) - t0_wall for node in nodes}
    return MethodRun(
        seconds=seconds,
        paths=paths,
        wall_seconds=wall,
        origin_bytes=setup.size,
        extra={"cpu": cpu},
    )


# ---- aria2 (BitTorrent) -------------------------------------------------------------

TRACKER_PORT = 6969
BT_PORT = 6881
ARIA2_RPC_PORT = 6800
ARIA2_LOG_LEVEL = "warn"


def bencode(value: Any) -> bytes:
    """BitTorrent's bencoding of int, bytes, str, list and dict (keys sorted)."""
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        items = sorted((k.encode() if isinstance(k, str) else k, v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def make_torrent(image: Path, announce: str, piece_length: int) -> tuple[bytes, str]:
    """(.torrent bytes, info hash in hex) for the single file IMAGE."""
    pieces = []
    with open(image, "rb") as f:
        while piece := f.read(piece_length):
            pieces.append(hashlib.sha1(piece).digest())
    info = {
        "name": image.name,
        "length": image.stat().st_size,
        "piece length": piece_length,
        "pieces": b"".join(pieces),
    }
    torrent = bencode({"announce": announce, "created by": "p2pcast cluster_bench", "info": info})
    return torrent, hashlib.sha1(bencode(info)).hexdigest()


def _aria2_argv(aria2c: str, torrent: Path, directory: Path, log: Path, n: int) -> list[str]:
    """aria2c options shared by the seeder and the leechers, tuned for a fast LAN."""
    return [
        aria2c, "--no-conf=true", f"--dir={directory}", f"--log={log}",
        f"--log-level={ARIA2_LOG_LEVEL}", "--console-log-level=warn",
        "--summary-interval=0", "--quiet=true",
        "--seed-ratio=0.0",  # with no --seed-time: seed until stopped
        "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
        "--enable-peer-exchange=true", f"--listen-port={BT_PORT}",
        f"--bt-max-peers={max(55, 2 * n)}", "--bt-request-peer-speed-limit=100M",
        "--bt-tracker-connect-timeout=5", "--bt-tracker-timeout=5",
        "--bt-tracker-interval=1", "--file-allocation=none", "--check-integrity=true",
        "--auto-file-renaming=false", "--allow-overwrite=true", "--disk-cache=32M",
        str(torrent),
    ]  # fmt: skip


def _seeder_stats(cluster: Cluster) -> dict[str, Any]:
    """The origin seeder's aria2.tellActive over its RPC port (origin's own loopback)."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "b", "method": "aria2.tellActive",
         "params": [["status", "uploadLength", "completedLength", "numSeeders",
                     "connections"]]}
    )  # fmt: skip
    out = cluster.run(
        "origin",
        ["curl", "--silent", "--max-time", "5", "--data", body,
         f"http://127.0.0.1:{ARIA2_RPC_PORT}/jsonrpc"],
        capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(out.stdout or "{}").get("result") or [{}]
    return dict(result[0])


def _tracker_complete(cluster: Cluster, info_hash: str) -> int:
    """Seeders the tracker knows for INFO_HASH (a scrape, from the origin's namespace)."""
    quoted = urllib.parse.quote(bytes.fromhex(info_hash))
    url = f"http://{cluster.origin_address}:{TRACKER_PORT}/scrape?info_hash={quoted}"
    out = cluster.run("origin", ["curl", "--silent", "--max-time", "2", url], capture_output=True)
    m = re.search(rb"8:completei(\d+)e", out.stdout)
    return int(m.group(1)) if m else 0


def run_aria2(setup: Setup, meter: CpuMeter) -> MethodRun:
    """BitTorrent: opentracker and a seeding aria2c (the full image) in the origin, then
    one aria2c per node, all at once. Every node keeps seeding until the last is done;
    a node's time is when its aria2c has every piece (hash-checked), stamped by the
    --on-bt-download-complete hook. aria2c and opentracker are stopped by PID."""
    cluster = setup.cluster
    aria2c, tracker = shutil.which("aria2c"), shutil.which("opentracker")
    if aria2c is None or tracker is None:
        raise RuntimeError("aria2 needs aria2c and opentracker: apt-get install aria2 opentracker")
    nodes = cluster.nodes
    work = setup.work
    origin_ip = cluster.origin_address
    announce = f"http://{origin_ip}:{TRACKER_PORT}/announce"
    torrent_bytes, info_hash = make_torrent(setup.image, announce, setup.piece_length)
    torrent = work / "image.torrent"
    torrent.write_bytes(torrent_bytes)
    hook = work / "done-hook.sh"
    hook.write_text('#!/bin/sh\ndate +%s.%N > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"\n')
    hook.chmod(0o755)
    paths = {node: str(work / node / setup.image.name) for node in nodes}
    stamps = {node: Path(paths[node] + ".done") for node in nodes}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []
    # Debian's opentracker is built with a whitelist of info hashes: give it ours. It
    # reads the list after dropping to user nobody (it refuses to run as root), so the
    # list lives in a world-readable directory of its own; `-d /` makes its chroot a no-op.
    listdir = Path(tempfile.mkdtemp(prefix="p2pcast-tracker-"))
    try:
        listdir.chmod(0o755)
        (listdir / "whitelist.txt").write_text(info_hash + "\n")
        (listdir / "whitelist.txt").chmod(0o644)
        (work / "opentracker.conf").write_text(f"access.whitelist {listdir / 'whitelist.txt'}\n")
        log = open(work / "opentracker.log", "wb")  # noqa: SIM115 (closed in finally)
        logs.append(log)
        procs["tracker"] = cluster.popen(
            "origin",
            [tracker, "-f", str(work / "opentracker.conf"), "-d", "/", "-i", origin_ip,
             "-p", str(TRACKER_PORT), "-P", str(TRACKER_PORT)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work,
        )  # fmt: skip
        seed_dir = work / "seed"
        seed_dir.mkdir()
        os.link(setup.image, seed_dir / setup.image.name)
        argv = _aria2_argv(aria2c, torrent, seed_dir, work / "seed.log", len(nodes))
        argv[1:1] = [
            "--bt-seed-unverified=true", "--enable-rpc=true",
            f"--rpc-listen-port={ARIA2_RPC_PORT}", "--rpc-listen-all=false",
        ]  # fmt: skip
        argv.remove("--check-integrity=true")  # the origin's file is the reference
        procs["origin"] = cluster.popen(
            "origin", argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while _tracker_complete(cluster, info_hash) < 1:
            for name in ("tracker", "origin"):
                if procs[name].poll() is not None:
                    raise RuntimeError(f"aria2: {name} exited ({procs[name].returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError("aria2: the seeder did not reach the tracker")
            time.sleep(0.05)
        for node in nodes:
            (work / node).mkdir()
        meter.start()
        t0 = time.monotonic()
        t0_wall = time.time()
        for node in nodes:
            argv = _aria2_argv(aria2c, torrent, work / node, work / f"{node}.log", len(nodes))
            argv[1:1] = [f"--on-bt-download-complete={hook}"]
            procs[node] = cluster.popen(
                node, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        deadline = t0 + setup.timeout
        while not all(s.exists() for s in stamps.values()):
            if dead := {k: p.returncode for k, p in procs.items() if p.poll() is not None}:
                raise RuntimeError(f"aria2: exited before the last node was done: {dead}")
            if time.monotonic() > deadline:
                late = sorted(node for node, s in stamps.items() if not s.exists())
                raise TimeoutError(f"not done after {setup.timeout:.0f} s: {', '.join(late)}")
            time.sleep(0.01)
        wall = time.monotonic() - t0
        cpu = meter.stop()
        seeder = _seeder_stats(cluster)
    finally:
        # aria2c first (a second SIGTERM skips its goodbye to the tracker), then the tracker
        aria = [p for name, p in procs.items() if name != "tracker"]
        for proc in aria:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGTERM)
        _stop(aria)
        _stop([p for name, p in procs.items() if name == "tracker"])
        for f in logs:
            f.close()
        shutil.rmtree(listdir, ignore_errors=True)
    seconds = {node: float(stamps[node].read_text()) - t0_wall for node in nodes}
    uploaded = seeder.get("uploadLength")
    return MethodRun(
        seconds=seconds,
        paths=paths,
        wall_seconds=wall,
        origin_bytes=int(uploaded) if uploaded is not None else None,
        extra={"cpu": cpu, "piece_length": setup.piece_length},
    )


METHODS: dict[str, Callable[[Setup, CpuMeter], MethodRun]] = {
    "p2pcast": run_p2pcast,
    "http": run_http,
    "chain": run_chain,
    "aria2": run_aria2,
}
