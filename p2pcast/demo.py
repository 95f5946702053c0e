"""``p2pcast demo``: the whole path on one machine, no Ceph, no Slurm, no root.

Pushes an image (generated, or given) to a directory origin, starts N daemon
processes on 127.0.0.2..N+1, broadcasts, checks every copy against the
manifest's sha256, stages one copy, and compares with the naive way (every
node reading the whole image from the origin).

With ``--ceph`` (``--ceph rados``) the origin is a real single-node Ceph
started by tools/ceph.py (or the one already up under its default name), read
over S3 from radosgw (or from the OSDs over librados), and the report adds
what Ceph itself counted it served. That needs a source checkout (tools/) and
the Ceph packages (tools/setup.sh); the default demo needs neither.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from p2pcast import control, manifest
from p2pcast.auth import write_secret_file
from p2pcast.cli import Progress, run
from p2pcast.errors import ConfigError, ImageDigestMismatch, StageError
from p2pcast.hashing import file_sha256
from p2pcast.names import ImageRef
from p2pcast.origins.base import OriginConfig, open_origin
from p2pcast.publish import push
from p2pcast.sizes import human

#: How long daemons get to start answering on their control sockets (s).
DAEMON_START_TIMEOUT = 20.0

#: Members of the generated tar: big enough to be quick to write, small enough
#: that the image has a realistic tree.
MEMBER_SIZE = 4 << 20

OS_RELEASE = b'PRETTY_NAME="p2pcast demo image"\nID=p2pcast-demo\n'

#: tools/ceph.py in a source checkout (the demo's Ceph; not in a wheel).
CEPH_TOOL = Path(__file__).resolve().parent.parent / "tools" / "ceph.py"
#: The instance `tools/ceph.py up` makes by default: used if it is up
#: (P2PCAST_CEPH_NAME names another).
CEPH_DEFAULT_INSTANCE = "p2pc"
#: The instance the demo starts (and stops) when no default one is up.
CEPH_DEMO_INSTANCE = "demo"
CEPH_BUCKET = "p2pcast-demo"


def make_image(path: Path, size: int, seed: int = 7) -> None:
    """A tar of ~size bytes: 3/4 incompressible, 1/4 text-like (both codecs show)."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij ") for _ in range(8)) for _ in range(512)]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("etc/os-release", OS_RELEASE), ("bin/hello", b"#!/bin/sh\necho hi\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
        written, n = 0, 0
        while written < size:
            member = min(MEMBER_SIZE, size - written)
            if n % 4 == 3:
                data = b"".join(rng.choice(words) for _ in range(member // 8 + 1))[:member]
            else:
                data = rng.randbytes(member)
            info = tarfile.TarInfo(f"data/blob{n:05d}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            written += member + 512
            n += 1


def stop_processes(procs: Iterable[subprocess.Popen[Any]], timeout: float = 10.0) -> None:
    """SIGTERM every process we started (by PID), then SIGKILL what is still
    there after TIMEOUT seconds; reap them all. Used by the demo, the
    benchmarks and the tests for their daemons and helpers."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class DemoCluster:
    """N daemon processes on 127.0.0.2..; stopped by PID."""

    def __init__(
        self,
        work: Path,
        nodes: int,
        origin: Path | str,
        loop: str,
        sendfile: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.work = work
        self.env = {**os.environ, **(env or {})}  # e.g. Ceph's endpoint and keys
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.hosts = {name: f"127.0.0.{i + 1}" for i, name in enumerate(self.names, start=1)}
        self.port = free_port("127.0.0.2")
        self.origin = origin
        self.loop = loop
        self.sendfile = sendfile
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: the shared secret of these daemons (a fresh one per work directory):
        #: they authenticate each other as a cluster's daemons do
        self.secret_file = work / "secret"

    def control(self, name: str) -> str:
        return str(self.work / "nodes" / name / "control.sock")

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        write_secret_file(self.secret_file)
        for name in self.names:
            self.start_node(name)

    def start_node(self, name: str) -> None:
        """Start (or restart, with the same state directory) one node's daemon."""
        state = self.work / "nodes" / name
        state.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "p2pcast", "daemon",
            "--node", name, "--listen", self.hosts[name], "--port", str(self.port),
            "--state-dir", str(state), "--control", self.control(name),
            "--origin", str(self.origin), "--loop", self.loop,
            "--auth", "secret", "--secret-file", str(self.secret_file),
        ]  # fmt: skip
        if not self.sendfile:
            cmd.append("--no-sendfile")
        log = open(state / "daemon.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        for name in self.names:
            proc = self.procs[name]
            log = self.work / "nodes" / name / "daemon.log"
            await control.wait_ready(self.control(name), proc.poll, log, deadline, f"daemon {name}")

    def stop(self) -> None:
        stop_processes(self.procs.values())


async def broadcast(
    cluster: DemoCluster, ref: ImageRef, peers: list[str], bar: Progress
) -> dict[str, dict[str, Any]]:
    """Ask every node in ``peers`` to fetch; return each node's final progress."""
    done: dict[str, int] = {}
    total = 0

    async def one(name: str) -> dict[str, Any]:
        nonlocal total
        result: dict[str, Any] = {}
        hostlist = f"n[{','.join(p[1:] for p in peers)}]" if len(peers) > 1 else peers[0]
        async for kind, body in control.call(
            cluster.control(name),
            "fetch",
            image=str(ref),
            peers=hostlist,
            node=name,
            addresses=cluster.hosts,
            job="demo",
        ):
            total = int(body["bytes_total"]) * len(peers)
            done[name] = int(body["bytes_done"])
            bar.update(sum(done.values()), total)
            if kind == control.RESULT:
                result = body
        return result

    results = await asyncio.gather(*(one(name) for name in peers))
    return dict(zip(peers, results, strict=True))


def _scratch(needed: int) -> Path:
    """A temporary directory in RAM (/dev/shm) when it has room, else in /tmp.

    Node caches on compute nodes are usually local SSD or tmpfs; the demo's
    eight caches on one disk would measure that disk, not p2pcast.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        stat = os.statvfs(shm)
        if stat.f_bavail * stat.f_frsize > 2 * needed:
            return Path(tempfile.mkdtemp(prefix="p2pcast-demo-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="p2pcast-demo-"))


class DemoCeph:
    """The Ceph behind ``demo --ceph``, driven through tools/ceph.py's CLI (the
    library does not import tools/). Stopped afterwards only if the demo started it."""

    def __init__(self, say: Any) -> None:
        if not CEPH_TOOL.is_file():
            raise ConfigError(f"demo --ceph needs a source checkout: {CEPH_TOOL} is missing")
        self.started = False
        self.name = os.environ.get("P2PCAST_CEPH_NAME", CEPH_DEFAULT_INSTANCE)
        self.env = self._env()
        if self.env is None:
            self.name = CEPH_DEMO_INSTANCE
            t0 = time.monotonic()
            # A free address of its own: an instance started later by hand keeps its default.
            self._tool("up", "--address", "auto")
            self.started = True
            self.env = self._env()
            assert self.env is not None
            say(f"started Ceph ({self.name}) in {time.monotonic() - t0:.1f} s, S3 at "
                f"{self.env['AWS_ENDPOINT_URL']}")  # fmt: skip
        else:
            say(f"using the running Ceph {self.name}, S3 at {self.env['AWS_ENDPOINT_URL']}")

    def _tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, str(CEPH_TOOL), *args, "--name", self.name],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0 and args[0] not in ("env", "status"):
            raise ConfigError(f"tools/ceph.py {args[0]}: {proc.stderr.strip()}")
        return proc

    def _env(self) -> dict[str, str] | None:
        if self._tool("status").returncode != 0:
            return None
        env: dict[str, str] = json.loads(self._tool("env", "--json").stdout)
        return env

    def origin(self, kind: str) -> tuple[str, OriginConfig]:
        assert self.env is not None
        if kind == "rados":
            return "rados://p2pcast", OriginConfig(rados_conf=self.env["CEPH_CONF"])
        return f"s3://{CEPH_BUCKET}", OriginConfig(
            s3_endpoints=(self.env["AWS_ENDPOINT_URL"],),
            s3_access_key=self.env["AWS_ACCESS_KEY_ID"],
            s3_secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def counters(self) -> dict[str, Any]:
        """What Ceph has served so far, by its own perf counters."""
        counted: dict[str, Any] = json.loads(self._tool("counters", "--json").stdout)
        return counted

    def stop(self) -> None:
        if self.started:
            self._tool("down")


def _ceph_served(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    osd = sum(v["op_out_bytes"] for v in after["osd"].values()) - sum(
        v["op_out_bytes"] for v in before["osd"].values()
    )
    return {"rgw_bytes": after["rgw"]["get_b"] - before["rgw"]["get_b"], "osd_bytes": osd}


def run_demo(args: argparse.Namespace) -> int:
    size = os.path.getsize(args.image) if args.image else args.size
    # the image, the origin, N caches and one staged copy
    work = Path(args.workdir) if args.workdir else _scratch(size * (args.nodes * 2 + 3))
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if args.json else print
    cluster: DemoCluster | None = None
    ceph: DemoCeph | None = None
    try:
        image = Path(args.image) if args.image else work / "demo-image.tar"
        if not args.image:
            say(f"generating a {human(args.size)} tar image in {image} ...")
            make_image(image, args.size)
        origin_url, origin_config = str(work / "origin"), OriginConfig()
        if args.ceph:
            ceph = DemoCeph(say)
            origin_url, origin_config = ceph.origin(args.ceph)
        ref = ImageRef("demo", "latest")

        async def publish() -> manifest.Manifest:
            async with open_origin(origin_url, origin_config) as origin:
                return (await push(str(image), origin, ref, chunk_size=args.chunk_size)).manifest

        m = run(publish())
        say(
            f"pushed {ref}: {m.image_type}, {human(m.size)}, {m.chunk_count} chunks "
            f"({human(m.stored_total)} stored) to {origin_url}"
        )
        cluster = DemoCluster(
            work, args.nodes, origin_url, args.loop, not args.no_sendfile,
            env=ceph.env if ceph else None,
        )  # fmt: skip
        cluster.start()
        run(cluster.wait_ready())
        say(f"started {args.nodes} daemons on 127.0.0.2-{args.nodes + 1}:{cluster.port}")

        # Ceph's counters before, between and after the two ways.
        counted: list[dict[str, Any]] = [ceph.counters()] if ceph else []
        cpu0 = _cpu(cluster)
        t0 = time.monotonic()
        results = run(broadcast(cluster, ref, cluster.names, Progress("p2pcast", not args.json)))
        p2p_wall = time.monotonic() - t0
        p2p_cpu = _cpu(cluster) - cpu0
        say("")
        if ceph:
            counted.append(ceph.counters())

        # Check every copy ourselves, independently of the daemons' checks.
        want = m.sha256.hex()
        for name, res in results.items():
            got = file_sha256(res["path"])
            res["sha256_ok"] = got == want
            if got != want:
                raise ImageDigestMismatch(f"{name}'s copy does not match the manifest")

        staged = _stage_one(results[cluster.names[0]], work / "staged", say)

        # The naive way: every node reads the whole image from the origin.
        for name in cluster.names:
            run(control.request(cluster.control(name), "cache-gc"))
        cpu0 = _cpu(cluster)
        t0 = time.monotonic()
        naive: dict[str, dict[str, Any]] = {}

        async def naive_all() -> None:
            bar = Progress("naive  ", not args.json)
            outs = await asyncio.gather(
                *(broadcast(cluster, ref, [name], bar) for name in cluster.names)
            )
            for out in outs:
                naive.update(out)

        run(naive_all())
        naive_wall = time.monotonic() - t0
        naive_cpu = _cpu(cluster) - cpu0
        say("")

        report = _report(m, results, naive, p2p_wall, naive_wall, p2p_cpu, naive_cpu, staged)
        if ceph:
            # By Ceph's own counters: radosgw's bytes sent, or the OSDs' bytes read.
            counted.append(ceph.counters())
            key = "osd_bytes" if args.ceph == "rados" else "rgw_bytes"
            for side, index in (("p2pcast", 0), ("naive", 1)):
                served = _ceph_served(counted[index], counted[index + 1])
                report[side]["ceph_served"] = served[key]
                report[side]["ceph_served_per_image"] = round(served[key] / m.stored_total, 3)
            report["origin"] = origin_url
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            _print_report(report)
        return 0
    except StageError as exc:
        raise exc
    finally:
        if cluster is not None:
            cluster.stop()
        if ceph is not None:
            ceph.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _cpu(cluster: DemoCluster) -> float:
    """CPU seconds used so far by the daemons (user + system)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for proc in cluster.procs.values():
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _stage_one(result: dict[str, Any], dest: Path, say: Any) -> dict[str, Any]:
    from p2pcast.stage import stage_image

    t0 = time.monotonic()
    staged = stage_image(result["path"], result["image_type"], dest)
    seconds = time.monotonic() - t0
    try:
        files = sum(len(f) for _, _, f in os.walk(staged.path))
        release = staged.path / "etc" / "os-release"
        say(
            f"staged one copy by {staged.method} in {seconds:.2f} s: {files} files at {staged.path}"
        )
        if release.exists():
            say("  " + release.read_text().splitlines()[0])
        return {"method": staged.method, "seconds": round(seconds, 3), "files": files}
    finally:
        staged.unstage()


def _report(
    m: manifest.Manifest,
    p2p: dict[str, dict[str, Any]],
    naive: dict[str, dict[str, Any]],
    p2p_wall: float,
    naive_wall: float,
    p2p_cpu: float,
    naive_cpu: float,
    staged: dict[str, Any],
) -> dict[str, Any]:
    def side(results: dict[str, dict[str, Any]], wall: float, cpu: float) -> dict[str, Any]:
        origin = sum(int(r["from_origin"]) for r in results.values())
        return {
            "nodes": {
                name: {
                    "seconds": r["seconds"],
                    "MB_per_s": round(m.size / r["seconds"] / 1e6, 1),
                    "from_origin": r["from_origin"],
                    "from_peers": r["from_peers"],
                    "sha256_ok": r.get("sha256_ok", True),
                }
                for name, r in results.items()
            },
            "last_node_seconds": round(max(r["seconds"] for r in results.values()), 3),
            "wall_seconds": round(wall, 3),
            "origin_bytes": origin,
            "origin_reads_per_image": round(origin / m.stored_total, 3),
            "cpu_seconds": round(cpu, 2),
            "cpu_cores_busy": round(cpu / wall, 2),
        }

    return {
        "image": {
            "name": m.name,
            "size": m.size,
            "stored": m.stored_total,
            "chunks": m.chunk_count,
        },
        "p2pcast": side(p2p, p2p_wall, p2p_cpu),
        "naive": side(naive, naive_wall, naive_cpu),
        "staged": staged,
        "cpus": os.cpu_count(),
    }


def _print_report(r: dict[str, Any]) -> None:
    head = ("node", "seconds", "MB/s", "from origin", "from peers")
    print(f"\n{head[0]:6s} {head[1]:>8s} {head[2]:>8s} {head[3]:>12s} {head[4]:>12s}  sha256")
    for name, n in r["p2pcast"]["nodes"].items():
        print(
            f"{name:6s} {n['seconds']:8.2f} {n['MB_per_s']:8.1f} {human(n['from_origin']):>12s} "
            f"{human(n['from_peers']):>12s}  {'ok' if n['sha256_ok'] else 'MISMATCH'}"
        )
    for label, key in (("p2pcast", "p2pcast"), ("naive  ", "naive")):
        s = r[key]
        print(
            f"{label}: last node {s['last_node_seconds']:.2f} s, origin served "
            f"{human(s['origin_bytes'])} ({s['origin_reads_per_image']:.2f} x image), "
            f"CPU {s['cpu_seconds']:.1f} s ({s['cpu_cores_busy']:.2f} cores busy of {r['cpus']})"
        )
        if "ceph_served" in s:
            print(
                f"         Ceph's own counters ({r['origin']}): served "
                f"{human(s['ceph_served'])} ({s['ceph_served_per_image']:.3f} x image)"
            )
    print(
        "note: all nodes share this machine's CPUs and one local origin; on a cluster the\n"
        "naive way's origin traffic grows with N while p2pcast's stays ~1x the image."
    )
