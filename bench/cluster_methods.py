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

Faults (``Setup.fault``): a straggler needs nothing here (its link is shaped
when the cluster is built); a kill is done by ``Killer``, a thread that polls
the victim's progress (p2pcast: chunks held, from its daemon's status; http
and chain: the size of its copy; aria2: its aria2c's completedLength over RPC)
and SIGKILLs every process in the victim's namespace when it reaches
``Fault.at``. With a kill, a method does not raise when nodes fail: it returns
the nodes that completed, and says in ``extra["incomplete"]`` why the others
did not, so that a chain broken by the kill is a result rather than an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ceph_origin import CephOrigin
from bench.lying_daemon import LIE_MARK
from p2pcast import control
from p2pcast.auth import write_secret_file
from p2pcast.demo import stop_processes
from tools.cluster import Cluster, netns_pids

#: How often the kill watcher looks at the victim's progress (s).
KILL_POLL = 0.05

#: Ports inside the namespaces (each namespace has its own port space).
P2PCAST_PORT = 7086
CHAIN_PORT = 9000

#: This checkout, for what runs from it uninstalled (bench.lying_daemon).
REPO = str(Path(__file__).resolve().parent.parent)

#: Seconds for daemons to answer their control sockets / a chain hop to listen.
START_TIMEOUT = 30.0

#: The raw image file's name in the origin directory (for http and chain).
RAW_NAME = "raw/image.tar"
#: curl as the status quo runs it: quiet, errors shown, an HTTP error fails.
CURL_OPTIONS = ("--silent", "--show-error", "--fail")


@dataclasses.dataclass
class MethodRun:
    """What one method did in one timed window."""

    seconds: dict[str, float]  # node -> seconds from the common start to its copy complete
    paths: dict[str, str]  # node -> its copy
    wall_seconds: float  # start of the window to the last node (and every process) done
    origin_bytes: int | None  # bytes the origin served, as the method counts them
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # per node and global


@dataclasses.dataclass(frozen=True)
class Fault:
    """One faulty node: a straggler (slow link, set when the cluster is built) or a
    node killed with SIGKILL once it holds AT of the image."""

    scenario: str  # "straggler" or "kill"
    node: str  # e.g. "n3"
    at: float = 0.5  # kill: the fraction of its progress at which it dies
    #: partition, origin-outage: how long the link stays cut (s)
    duration: float = 0.0
    #: the node whose progress times the fault (default NODE; the origin has none)
    watch: str = ""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every method needs: the cluster, the origin's URL, the image and scratch space."""

    cluster: Cluster
    origin_url: str  # http://ORIGIN_IP:PORT, or s3://BUCKET with ceph
    origin_dir: Path
    image: Path  # the raw image file (also at origin_dir / RAW_NAME)
    image_ref: str  # name:tag pushed to the origin
    size: int
    work: Path  # scratch for this method (per-node copies, daemon state)
    timeout: float  # seconds for the whole transfer
    piece_length: int = 1 << 20  # aria2: the torrent's piece length
    verbose: bool = False  # daemons log what they do (for --keep-logs)
    fault: Fault | None = None
    #: The origin is a Ceph on the host (S3 through radosgw) instead of the origin
    #: namespace's HTTP server: p2pcast reads its chunk objects, http and chain GET
    #: the whole image object.
    ceph: CephOrigin | None = None

    def raw_source(self) -> list[str]:
        """curl's arguments that fetch the whole raw image from the origin."""
        if self.ceph is not None:
            return self.ceph.curl_args()
        return [f"{self.origin_url}/{RAW_NAME}"]

    @property
    def victim(self) -> str | None:
        """The node to kill, if this run kills one."""
        return self.fault.node if self.fault and self.fault.scenario == "kill" else None

    @property
    def liar(self) -> str | None:
        """The node whose daemon corrupts chunks it serves, if this run has one."""
        return self.fault.node if self.fault and self.fault.scenario == "corrupt" else None

    @property
    def outage(self) -> Fault | None:
        """The fault, if this run cuts a link for a while (partition, origin-outage)."""
        return self.fault if self.fault and self.fault.duration > 0 else None


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

    def __init__(self, cluster: Cluster, also: Callable[[], list[int]] | None = None) -> None:
        self.cluster = cluster
        self.also = also  # PIDs outside the namespaces to count too (a Ceph on the host)

    def _ns(self) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        pids = [pid for host in self.cluster.hosts.values() for pid in netns_pids(host.namespace)]
        for pid in pids + (self.also() if self.also is not None else []):
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


def _wait_all(
    procs: dict[str, subprocess.Popen[Any]],
    t0: float,
    timeout: float,
    incomplete: dict[str, str] | None = None,
) -> dict[str, float]:
    """Wait for every process (one thread each, so each exit is timed as it happens);
    return node -> seconds from T0 (time.monotonic) to its exit. Raise on a failure,
    unless INCOMPLETE is given (a kill): then the late and failed go there instead,
    and only the processes that exited with status 0 are returned."""
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
        stop_processes(list(procs.values()))
        if incomplete is None:
            raise TimeoutError(f"not done after {timeout:.0f} s: {', '.join(late)}")
        incomplete |= {node: f"not done after {timeout:.0f} s" for node in late}
    failed = {node: p.returncode for node, p in procs.items() if p.returncode not in (0, None)}
    if failed and incomplete is None:
        raise RuntimeError(f"exit status != 0: {failed}")
    if incomplete is not None:
        incomplete |= {node: f"exit status {rc}" for node, rc in failed.items()}
    return {node: t for node, t in ends.items() if node not in failed}


class Killer:
    """Kills one node at a fraction of its progress: a thread polls PROGRESS (the
    fraction of the image the node holds, or None while unknown) every KILL_POLL s
    and, once it reaches AT, sends SIGKILL to every process in the node's namespace
    (a p2pcast daemon, a curl, an aria2c, or a chain hop's sh, nc, tee and nc: what
    a crash of that machine would take down). Polling, not a byte-exact trigger:
    the kill lands within one poll (and one status round trip) of the mark, and the
    fraction actually seen is recorded."""

    def __init__(
        self,
        cluster: Cluster,
        node: str,
        progress: Callable[[], float | None],
        at: float,
        t0: float,
    ) -> None:
        self.cluster, self.node, self.progress, self.at, self.t0 = cluster, node, progress, at, t0
        self.killed_at: float | None = None  # seconds from T0
        self.killed_progress: float | None = None
        self.killed_pids: list[int] = []
        self.last_error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"kill {node}", daemon=True)

    def start(self) -> Killer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.is_set():
            try:
                fraction = self.progress()
            except Exception as exc:  # not up yet, or gone: look again
                self.last_error, fraction = f"{type(exc).__name__}: {exc}", None
            if fraction is not None and fraction >= self.at:
                self._fire(fraction)
                return
            self._done.wait(KILL_POLL)

    def _fire(self, fraction: float) -> None:
        self.killed_at = time.monotonic() - self.t0
        self.killed_progress = round(fraction, 4)
        self.killed_pids = kill_node(self.cluster, self.node)

    def record(self) -> dict[str, Any]:
        """What the kill did, for the result record."""
        return {
            "killed_at_seconds": None if self.killed_at is None else round(self.killed_at, 3),
            "killed_progress": self.killed_progress,
            "killed_pids": self.killed_pids,
            **({"kill_error": self.last_error} if self.killed_at is None else {}),
        }


class Outage(Killer):
    """Cuts one host's link (a node, or the origin) for DURATION seconds once the
    watched node's progress reaches AT, then restores it: the same watcher as
    Killer. Stopping it early (the run ended or failed) restores the link at once."""

    def __init__(
        self,
        cluster: Cluster,
        node: str,
        progress: Callable[[], float | None],
        at: float,
        t0: float,
        duration: float,
    ) -> None:
        super().__init__(cluster, node, progress, at, t0)
        self.duration = duration
        self.restored_at: float | None = None

    def _fire(self, fraction: float) -> None:
        self.killed_at = time.monotonic() - self.t0
        self.killed_progress = round(fraction, 4)
        self.cluster.cut(self.node)
        try:
            self._done.wait(self.duration)
        finally:
            self.cluster.restore(self.node)
            self.restored_at = time.monotonic() - self.t0

    def record(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {
            "cut_at_seconds": r(self.killed_at),
            "cut_progress": self.killed_progress,
            "restored_at_seconds": r(self.restored_at),
            **({"cut_error": self.last_error} if self.killed_at is None else {}),
        }


def kill_node(cluster: Cluster, node: str) -> list[int]:
    """SIGKILL every process in NODE's network namespace (by PID); return the PIDs."""
    pids = netns_pids(cluster.namespace(node))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _file_progress(path: str, size: int) -> Callable[[], float | None]:
    """The fraction of SIZE written to PATH (http's curl and the chain's tee write in
    order, so the file's size is what the node has received)."""

    def progress() -> float | None:
        try:
            return os.path.getsize(path) / size
        except FileNotFoundError:
            return None

    return progress


# ---- p2pcast ------------------------------------------------------------------------


def _sockets(work: Path) -> Path:
    """A short directory of its own for a run's control sockets. A UNIX socket path
    is limited to 107 bytes, and one under the run's directory went past it: under
    pytest's tmp_path, "pytest-99" became "pytest-100" and the origin-outage run's
    "...-origin-outage-r0/n1.sock" no longer fit (the daemon could not start)."""
    digest = hashlib.sha256(str(work).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"p2pcast-cb-{digest}"


def _control(work: Path, node: str) -> str:
    return str(_sockets(work) / f"{node}.sock")


async def _ready(setup: Setup, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for node, proc in procs.items():
        log = setup.work / node / "daemon.log"
        await control.wait_ready(
            _control(setup.work, node), proc.poll, log, deadline,
            f"daemon {node}",
        )  # fmt: skip


def _p2pcast_progress(sock: str) -> Callable[[], float | None]:
    """Chunks held / chunks in the image, from the daemon's `status` (its own loop in
    the kill watcher's thread; one short UNIX-socket round trip per poll)."""

    def progress() -> float | None:
        body = asyncio.run(control.request(sock, "status"))
        for b in body.get("broadcasts", []):
            if b.get("chunks_total"):
                return int(b["chunks_done"]) / int(b["chunks_total"])
        return None  # the fetch has not reached the daemon yet

    return progress


async def _broadcast(
    setup: Setup, incomplete: dict[str, str] | None = None
) -> tuple[float, dict[str, dict[str, Any]], dict[str, float]]:
    """Fetch on every node at once; (t0, node -> RESULT body, node -> seconds seen here).
    With INCOMPLETE (a kill), a node's failure or lateness is put there, not raised,
    and only the nodes that got their RESULT are returned."""
    nodes = setup.cluster.nodes
    hostlist = f"n[1-{len(nodes)}]" if len(nodes) > 1 else nodes[0]
    seen: dict[str, float] = {}
    bodies: dict[str, dict[str, Any]] = {}

    async def one(node: str, t0: float) -> None:
        try:
            body = await control.request(
                _control(setup.work, node),
                "fetch",
                image=setup.image_ref,
                peers=hostlist,
                node=node,
                addresses=setup.cluster.addresses,
                job="cluster-bench",
            )
        except Exception as exc:  # the killed daemon drops its connection (no RESULT)
            if incomplete is None:
                raise
            incomplete[node] = f"{type(exc).__name__}: {exc}"
            return
        seen[node] = time.monotonic() - t0
        bodies[node] = body

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(node, t0) for node in nodes)), setup.timeout)
    except TimeoutError:
        if incomplete is None:
            raise
        late = [n for n in nodes if n not in bodies and n not in incomplete]
        incomplete |= {node: f"not done after {setup.timeout:.0f} s" for node in late}
    return t0, bodies, seen


def run_p2pcast(setup: Setup, meter: CpuMeter, loop: str = "uvloop") -> MethodRun:
    """One p2pcast daemon per node (started first, not timed), then one broadcast."""
    cluster = setup.cluster
    procs: dict[str, subprocess.Popen[bytes]] = {}
    _sockets(setup.work).mkdir(mode=0o700, exist_ok=True)
    try:
        for node, address in cluster.addresses.items():
            state = setup.work / node
            state.mkdir(parents=True, exist_ok=True)
            # The corrupt scenario's faulty node runs the lying daemon instead.
            lies = setup.liar == node
            program = ["-m", "bench.lying_daemon"] if lies else ["-m", "p2pcast", "daemon"]
            argv = [
                sys.executable, *program,
                "--node", node, "--listen", address, "--port", str(P2PCAST_PORT),
                "--state-dir", str(state), "--control", _control(setup.work, node),
                "--origin", setup.origin_url, "--loop", loop,
                "--auth", "secret", "--secret-file", str(write_secret_file(setup.work / "secret")),
            ] + (["--verbose"] if setup.verbose else [])  # fmt: skip
            env = os.environ | (setup.ceph.daemon_env() if setup.ceph is not None else {})
            if lies:  # bench/ is not installed: run it from this checkout
                paths = [REPO, env.get("PYTHONPATH", "")]
                env = env | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
            with open(state / "daemon.log", "wb") as log:
                procs[node] = cluster.popen(
                    node, argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env,
                )  # fmt: skip
        asyncio.run(_ready(setup, procs))
        incomplete: dict[str, str] | None = None
        killer: Killer | None = None
        if setup.victim is not None and setup.fault is not None:
            incomplete = {}
            progress = _p2pcast_progress(_control(setup.work, setup.victim))
            # t0 of the watcher only dates the kill; the broadcast's t0 is a hair later
            killer = Killer(cluster, setup.victim, progress, setup.fault.at, time.monotonic())
        elif (outage := setup.outage) is not None:
            progress = _p2pcast_progress(_control(setup.work, outage.watch or outage.node))
            killer = Outage(
                cluster, outage.node, progress, outage.at, time.monotonic(), outage.duration
            )
        meter.start()
        if killer is not None:
            killer.start()
        try:
            t0, bodies, seen = asyncio.run(_broadcast(setup, incomplete))
        finally:
            if killer is not None:
                killer.stop()
        wall = time.monotonic() - t0
        cpu = meter.stop()
        if incomplete is not None:
            # A survivor whose daemon is gone: say how it ended (a signal, an exit code).
            for node, message in list(incomplete.items()):
                code = procs[node].poll()
                if code is not None and node != setup.victim:
                    incomplete[node] = f"{message} (daemon ended: returncode {code})"
    finally:
        stop_processes(list(procs.values()))
        shutil.rmtree(_sockets(setup.work), ignore_errors=True)
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
    extra: dict[str, Any] = {"cpu": cpu, "nodes": per_node}
    if bodies:
        extra["stored_bytes"] = int(next(iter(bodies.values()))["bytes_total"])
    if killer is not None and incomplete is not None:
        # The killed daemon's origin reads are not known (it never answered): the
        # origin bytes are the survivors' only.
        extra |= {"incomplete": incomplete, "kill": killer.record()}
    elif killer is not None:
        extra["outage"] = killer.record()
    if setup.liar is not None:
        extra["corrupt"] = _lies(setup.work / setup.liar / "daemon.log", setup.liar, bodies)
    return MethodRun(
        seconds=seen,
        paths={node: str(body["path"]) for node, body in bodies.items()},
        wall_seconds=wall,
        origin_bytes=sum(int(b["origin_bytes_read"]) for b in bodies.values()),
        extra=extra,
    )


def _lies(log: Path, liar: str, bodies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the lying daemon did and who caught it: the lies it logged, and the
    nodes that ended with it among their dead (banned) peers."""
    try:
        told = log.read_text(errors="replace").count(LIE_MARK)
    except OSError:
        told = 0
    banned_by = [n for n, body in bodies.items() if liar in (body.get("dead_peers") or [])]
    return {"lies": told, "banned_by": sorted(banned_by, key=lambda s: int(s[1:]))}


# ---- http ---------------------------------------------------------------------------


def run_http(setup: Setup, meter: CpuMeter) -> MethodRun:
    """Every node downloads the whole image file from the origin at once (curl)."""
    cluster = setup.cluster
    paths = {node: str(setup.work / f"{node}.tar") for node in cluster.nodes}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    victim = setup.victim
    incomplete: dict[str, str] | None = None if victim is None else {}
    killer: Killer | None = None
    try:
        meter.start()
        t0 = time.monotonic()
        for node in cluster.nodes:
            argv = ["curl", *CURL_OPTIONS, "--output", paths[node], *setup.raw_source()]
            procs[node] = cluster.popen(node, argv, stdin=subprocess.DEVNULL)
        if victim is not None and setup.fault is not None:
            progress = _file_progress(paths[victim], setup.size)
            killer = Killer(cluster, victim, progress, setup.fault.at, t0).start()
        try:
            seconds = _wait_all(procs, t0, setup.timeout, incomplete)
        finally:
            if killer is not None:
                killer.stop()
        wall = time.monotonic() - t0
        cpu = meter.stop()
    finally:
        stop_processes(list(procs.values()))
    extra: dict[str, Any] = {"cpu": cpu}
    if killer is not None and incomplete is not None:
        extra |= {"incomplete": incomplete, "kill": killer.record()}
    return MethodRun(
        seconds=seconds,
        paths={node: paths[node] for node in seconds},
        wall_seconds=wall,
        origin_bytes=setup.size * len(cluster.nodes),
        extra=extra,
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
    victim = setup.victim
    incomplete: dict[str, str] | None = None if victim is None else {}
    killer: Killer | None = None
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
        send = f"{nc} -N {addr[nodes[0]]} {CHAIN_PORT}"
        if setup.ceph is None:
            procs["origin"] = cluster.popen(
                "origin", ["sh", "-c", f"{send} < {setup.image}"], stdin=subprocess.DEVNULL
            )
        else:  # the head GETs the image object from Ceph, on the host, into the chain
            get = shlex.join(["curl", *CURL_OPTIONS, *setup.raw_source()])
            procs["origin"] = subprocess.Popen(
                ["sh", "-c", f"{get} | {send}"], stdin=subprocess.DEVNULL
            )
        if victim is not None and setup.fault is not None:
            progress = _file_progress(paths[victim], setup.size)
            killer = Killer(cluster, victim, progress, setup.fault.at, t0).start()
        try:
            _wait_all(procs, t0, setup.timeout, incomplete)
        finally:
            if killer is not None:
                killer.stop()
        wall = time.monotonic() - t0
        cpu = meter.stop()
    finally:
        stop_processes(list(procs.values()))
    extra: dict[str, Any] = {"cpu": cpu}
    if killer is not None and incomplete is not None:
        # A hop whose neighbour died still ends (EOF or a broken pipe) and stamps
        # its file: whether its copy is whole is for the sha256 check to say.
        extra |= {"incomplete": incomplete, "kill": killer.record()}
        ended = [n for n in nodes if n != victim and Path(stamps[n]).exists()]
    else:
        ended = nodes
    seconds = {node: float(Path(stamps[node]).read_text()) - t0_wall for node in ended}
    return MethodRun(
        seconds=seconds,
        paths={node: paths[node] for node in ended},
        wall_seconds=wall,
        origin_bytes=setup.size,
        extra=extra,
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


def _aria2_progress(address: str, size: int) -> Callable[[], float | None]:
    """completedLength / SIZE of the aria2c at ADDRESS, over its JSON-RPC port (reached
    from the host through the bridge). Pieces arrive out of order and aria2 caches
    writes, so the size of its file would not say how much it holds."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "k", "method": "aria2.tellActive",
         "params": [["completedLength"]]}
    ).encode()  # fmt: skip
    url = f"http://{address}:{ARIA2_RPC_PORT}/jsonrpc"

    def progress() -> float | None:
        with urllib.request.urlopen(url, data=body, timeout=1) as reply:
            result = json.loads(reply.read()).get("result") or []
        return int(result[0]["completedLength"]) / size if result else None

    return progress


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
    victim = setup.victim
    incomplete: dict[str, str] | None = None if victim is None else {}
    killer: Killer | None = None
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
            if node == victim:  # only the victim: its progress is read over RPC
                argv[1:1] = [
                    "--enable-rpc=true", "--rpc-listen-all=true",
                    f"--rpc-listen-port={ARIA2_RPC_PORT}",
                ]  # fmt: skip
            procs[node] = cluster.popen(
                node, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        if victim is not None and setup.fault is not None:
            progress = _aria2_progress(cluster.addresses[victim], setup.size)
            killer = Killer(cluster, victim, progress, setup.fault.at, t0).start()
        deadline = t0 + setup.timeout
        # With a kill, the victim is not waited for, and a survivor whose aria2c
        # exits early (none should) is counted as incomplete rather than raised.
        waiting = {node: s for node, s in stamps.items() if node != victim}
        try:
            while pending := [k for k, s in waiting.items() if not s.exists()]:
                dead = {k: p.returncode for k, p in procs.items() if p.poll() is not None}
                dead.pop(victim or "", None)
                if dead and incomplete is None:
                    raise RuntimeError(f"aria2: exited before the last node was done: {dead}")
                late = time.monotonic() > deadline
                if late and incomplete is None:
                    raise TimeoutError(
                        f"not done after {setup.timeout:.0f} s: {', '.join(pending)}"
                    )
                if incomplete is not None and (dead or late):
                    seeding = not ({"origin", "tracker"} & set(dead))
                    for k in pending:
                        if late:
                            incomplete[k] = f"not done after {setup.timeout:.0f} s"
                        elif k in dead or not seeding:
                            incomplete[k] = f"aria2c exited: {dead}"
                    waiting = {k: s for k, s in waiting.items() if k not in incomplete}
                time.sleep(0.01)
        finally:
            if killer is not None:
                killer.stop()
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
        stop_processes(aria)
        stop_processes([p for name, p in procs.items() if name == "tracker"])
        for f in logs:
            f.close()
        shutil.rmtree(listdir, ignore_errors=True)
    ended = [node for node in nodes if node != victim and stamps[node].exists()]
    seconds = {node: float(stamps[node].read_text()) - t0_wall for node in ended}
    uploaded = seeder.get("uploadLength")
    extra: dict[str, Any] = {"cpu": cpu, "piece_length": setup.piece_length}
    if killer is not None and incomplete is not None:
        extra |= {"incomplete": incomplete, "kill": killer.record()}
    return MethodRun(
        seconds=seconds,
        paths={node: paths[node] for node in ended},
        wall_seconds=wall,
        origin_bytes=int(uploaded) if uploaded is not None else None,
        extra=extra,
    )


METHODS: dict[str, Callable[[Setup, CpuMeter], MethodRun]] = {
    "p2pcast": run_p2pcast,
    "http": run_http,
    "chain": run_chain,
    "aria2": run_aria2,
}
