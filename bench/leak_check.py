"""Leak check: many complete broadcasts in a row through real daemons (issue 6, point 6).

    .venv/bin/python -m bench.leak_check --cycles 50 --out bench/results/leaks.json

Three ``p2pcast daemon`` processes on 127.0.0.2-4 (peer auth by a shared
secret, each with its own state directory, control socket and run directory)
go through ``--cycles`` cycles, each with a different image (alternately
SquashFS made by mksquashfs and a plain tar, 4-8 MiB of random bytes): push it
to a directory origin, ``fetch`` it on all three at once over the control
socket, ``stage`` it for a job on all three (what the Slurm Prolog asks: a
kernel loop mount of the SquashFS, an unpacked tree of the tar), then
``release`` the job (the Epilog), and every ``GC_EVERY`` cycles ``cache-gc``
so complete broadcasts stop seeding and the cache empties.

After every cycle it reads, per daemon: open file descriptors
(/proc/PID/fd), RSS (VmRSS), threads, child processes (any /proc/*/stat whose
parent is the daemon, zombies included); and overall: mounts below the work
directory (/proc/self/mountinfo), loop devices whose backing file is below it
(/sys/block/loop*/loop/backing_file), and entries left in the run
directories' ``staged`` and ``jobs``. ``violations`` checks the figures
against the bounds below; the test (tests/test_daemon_leaks.py) asserts there
are none. Needs root (mounts, the root-only stage/release ops) and mksquashfs.
Everything is stopped by PID and removed afterwards, mounts and loop devices
included.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p2pcast import control
from p2pcast.auth import write_secret_file
from p2pcast.demo import free_port, stop_processes
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.stage import unstage_path

MiB = 1 << 20
NODES = ("n1", "n2", "n3")
HOSTS = {name: f"127.0.0.{i}" for i, name in enumerate(NODES, start=2)}
PEERS = f"n[1-{len(NODES)}]"
#: Small chunks: a 4-8 MiB image has 16-32 of them, enough for peers to relay
#: some to each other in every cycle (a real broadcast, not three origin reads).
CHUNK_SIZE = 256 * 1024
IMAGE_MIN = 4 * MiB
IMAGE_STEP = 1 * MiB  # sizes cycle 4, 5, 6, 7, 8 MiB

#: Cycles before the baseline: the first ones load modules, grow the default
#: thread pool, open the peer links and warm the allocator's arenas.
WARMUP = 5
#: cache-gc every this many cycles (and after the last): the figures compared
#: are always taken right after a gc, when no broadcast seeds and the cache is
#: empty, so they compare like with like.
GC_EVERY = 5

# ---- bounds (and why) --------------------------------------------------------
#: File descriptors may differ from the baseline by a peer link being
#: (re)opened at the moment of the reading (one socket per peer, and the
#: daemon has two peers); anything beyond that is a descriptor per cycle.
FD_SLACK = 2
#: RSS may wander with the allocator (arenas, freed but unreturned pages):
#: 50 cycles of 4-8 MiB images leaking a chunk buffer each would exceed it.
RSS_GROWTH_KIB = 32 * 1024
#: The default executor adds threads up to its cap (min(32, CPUs + 4)) only
#: when all are busy; a few more after the warm-up are not a leak, a thread
#: per cycle is.
THREAD_SLACK = 4

#: glibc malloc's settings for the daemons. By default glibc raises its mmap
#: threshold (up to 32 MiB) each time a big block is freed, after which the
#: chunk buffers (256 KiB-8 MiB here) come from the heaps of the main and the
#: worker threads' arenas and freed ones stay there: RSS after a gc then
#: wanders between 30 and 110 MiB from run to run with nothing alive in it.
#: A fixed threshold gives every such buffer back when freed, so RSS tracks
#: what the daemon holds and a real leak stands out. ``--default-malloc``
#: measures glibc's defaults instead (the README quotes both).
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

#: Bounds a daemon start, and one cycle's control requests.
START_TIMEOUT = 20.0
STEP_TIMEOUT = 60.0


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo: space, tab, newline, backslash are octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(top: Path) -> list[str]:
    root = os.path.realpath(top)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split(" ")[4])
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return found


def loops_under(top: Path) -> list[str]:
    """Loop devices attached to a file below ``top`` (a mount -o loop left behind)."""
    root = os.path.realpath(top)
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            target = backing.read_text().strip()
        except OSError:
            continue  # detached while we looked
        if target.startswith(root + "/"):
            found.append(f"/dev/{backing.parent.parent.name}={target}")
    return found


def children_of(pid: int) -> list[str]:
    """Processes whose parent is ``pid``, as "PID:STATE:COMM" (zombies included)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm_end = text.rfind(")")
        fields = text[comm_end + 2 :].split()
        if int(fields[1]) == pid:
            comm = text[text.find("(") + 1 : comm_end]
            found.append(f"{stat.parent.name}:{fields[0]}:{comm}")
    return found


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (socket, pipe, anon_inode, file): says what leaked."""
    kinds: dict[str, int] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        kind = target.split(":", 1)[0] if not target.startswith("/") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def sample(pid: int) -> dict[str, int]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_kib": int(status["VmRSS"][0]),
        "threads": int(status["Threads"][0]),
        "children": len(children_of(pid)),
    }


# ---- images ------------------------------------------------------------------


def make_image(work: Path, cycle: int) -> tuple[Path, str]:
    """Cycle ``cycle``'s image: even cycles SquashFS, odd ones tar; random bytes."""
    size = IMAGE_MIN + (cycle % 5) * IMAGE_STEP
    payload = random.Random(cycle).randbytes(size)
    release = f'PRETTY_NAME="p2pcast leak check {cycle}"\n'.encode()
    if cycle % 2 == 0:
        src = work / "src"
        shutil.rmtree(src, ignore_errors=True)
        (src / "etc").mkdir(parents=True)
        (src / "etc" / "os-release").write_bytes(release)
        (src / "payload").write_bytes(payload)
        out = work / "image.sqfs"
        cmd = ["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress"]
        subprocess.run(cmd, check=True, capture_output=True)
        return out, "squashfs"
    out = work / "image.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("etc/os-release", release), ("payload", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out, "tar"


# ---- daemons -----------------------------------------------------------------


class Daemons:
    """The three daemons; ``close`` stops them by PID and undoes any staging left."""

    def __init__(self, work: Path, origin: Path, malloc_env: dict[str, str]) -> None:
        self.work = work
        self.origin = origin
        self.env = {**os.environ, **malloc_env}
        self.port = free_port(HOSTS[NODES[0]])
        self.secret = write_secret_file(work / "secret")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def dir(self, name: str) -> Path:
        return self.work / "nodes" / name

    def control(self, name: str) -> str:
        return str(self.dir(name) / "control.sock")

    def run_dir(self, name: str) -> Path:
        return self.dir(name) / "run"

    def start(self) -> None:
        for name in NODES:
            state = self.dir(name)
            state.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable, "-m", "p2pcast", "daemon",
                "--node", name, "--listen", HOSTS[name], "--port", str(self.port),
                "--state-dir", str(state / "state"), "--control", self.control(name),
                "--run-dir", str(self.run_dir(name)), "--origin", str(self.origin),
                "--auth", "secret", "--secret-file", str(self.secret),
            ]  # fmt: skip
            with open(state / "daemon.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env
                )
        asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for name in NODES:
            proc = self.procs[name]
            log = self.dir(name) / "daemon.log"
            await control.wait_ready(self.control(name), proc.poll, log, deadline, f"daemon {name}")

    def log_tail(self, name: str) -> str:
        try:
            return (self.dir(name) / "daemon.log").read_text()[-2000:]
        except OSError:
            return ""

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def leftovers(self) -> list[str]:
        """Staged copies and job records still in the run directories."""
        found = []
        for name in NODES:
            for sub in ("staged", "jobs"):
                d = self.run_dir(name) / sub
                if d.is_dir():
                    found += [f"{name}/{sub}/{p.name}" for p in d.iterdir()]
        return found

    def close(self) -> None:
        stop_processes(self.procs.values())
        self.procs.clear()
        for name in NODES:  # what a failed run left staged
            staged = self.run_dir(name) / "staged"
            if staged.is_dir():
                for path in staged.iterdir():
                    unstage_path(path)


async def _cycle(daemons: Daemons, cycle: int, ref: ImageRef, gc: bool) -> int:
    """One broadcast, staged and released as a job on every node; then maybe gc.

    Returns the image bytes the nodes got from each other (not the origin).
    """
    image = str(ref)
    job = str(1000 + cycle)
    addresses = dict(HOSTS)

    async with asyncio.timeout(STEP_TIMEOUT):
        # What the Prolog's stage request carries (jobspec.PrologRequest.body).
        common = {"image": image, "peers": PEERS, "addresses": addresses}
        fetched = await asyncio.gather(
            *(control.request(daemons.control(n), "fetch", node=n, **common) for n in NODES)
        )
        for name, result in zip(NODES, fetched, strict=True):
            if result["state"] != "complete":
                raise AssertionError(f"cycle {cycle}: {name} fetch ended {result['state']}")
        job_body = {"job": job, "mounts": "", "uid": 0, "gid": 0, "user": "root", **common}
        staged = await asyncio.gather(
            *(control.request(daemons.control(n), "stage", node=n, **job_body) for n in NODES)
        )
        for name, result in zip(NODES, staged, strict=True):
            # The staged tree is really there: the job would run from it.
            if not (Path(result["root"]) / "etc" / "os-release").is_file():
                raise AssertionError(f"cycle {cycle}: {name} staged nothing at {result['root']}")
        await asyncio.gather(
            *(control.request(daemons.control(n), "release", job=job) for n in NODES)
        )
        if gc:
            await asyncio.gather(*(control.request(daemons.control(n), "cache-gc") for n in NODES))
    return sum(int(r.get("from_peers", 0)) for r in fetched)


def _settle(daemons: Daemons, timeout: float = 2.0) -> None:
    """Wait (briefly) for the daemons' child processes to be reaped: a mount(8)
    or umount(8) whose exit the loop has not collected yet is not a leak."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(children_of(daemons.pid(n)) for n in NODES):
            return
        time.sleep(0.05)


@contextmanager
def _work_dir(work: Path | None) -> Iterator[Path]:
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        try:
            yield work
        finally:
            _force_clean(work)
        return
    path = Path(tempfile.mkdtemp(prefix="p2pcast-leaks-"))
    try:
        yield path
    finally:
        _force_clean(path)
        shutil.rmtree(path, ignore_errors=True)


def _force_clean(work: Path) -> None:
    """Last resort after a failure: lazy-unmount and detach whatever is below ``work``."""
    for point in sorted(mounts_under(work), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for loop in loops_under(work):
        subprocess.run(["losetup", "-d", loop.split("=")[0]], check=False, capture_output=True)


def run(cycles: int, work: Path | None = None, *, pinned_malloc: bool = True) -> dict[str, Any]:
    """Run ``cycles`` cycles; the measured series and the final state, as JSON-ready data."""
    if cycles < WARMUP + GC_EVERY:
        raise ValueError(f"need at least {WARMUP + GC_EVERY} cycles")
    if os.geteuid() != 0:
        raise PermissionError("the leak check needs root (mounts, stage/release)")
    series: dict[str, dict[str, list[int]]] = {
        n: {"fds": [], "rss_kib": [], "threads": [], "children": []} for n in NODES
    }
    per_cycle: dict[str, list[Any]] = {
        "seconds": [], "from_peers": [], "mounts": [], "loops": [], "staged": []
    }  # fmt: skip
    started = time.monotonic()
    with _work_dir(work) as top:
        origin = top / "origin"
        malloc_env = PINNED_MALLOC if pinned_malloc else {}
        daemons = Daemons(top, origin, malloc_env)
        try:
            daemons.start()
            fds_at_start = {n: fd_kinds(daemons.pid(n)) for n in NODES}
            for cycle in range(cycles):
                t0 = time.monotonic()
                path, kind = make_image(top, cycle)
                ref = ImageRef(f"leak/{kind}{cycle}", "1")

                async def publish(path: Path = path, ref: ImageRef = ref) -> None:
                    async with DirectoryOrigin(origin) as o:
                        await push(path, o, ref, chunk_size=CHUNK_SIZE)

                asyncio.run(publish())
                gc = (cycle + 1) % GC_EVERY == 0 or cycle == cycles - 1
                from_peers = asyncio.run(_cycle(daemons, cycle, ref, gc))
                _settle(daemons)
                per_cycle["seconds"].append(round(time.monotonic() - t0, 3))
                per_cycle["from_peers"].append(from_peers)
                per_cycle["mounts"].append(len(mounts_under(top)))
                per_cycle["loops"].append(len(loops_under(top)))
                per_cycle["staged"].append(len(daemons.leftovers()))
                for name in NODES:
                    for key, value in sample(daemons.pid(name)).items():
                        series[name][key].append(value)
            final = {
                "mounts": mounts_under(top),
                "loops": loops_under(top),
                "staged": daemons.leftovers(),
                "children": {n: children_of(daemons.pid(n)) for n in NODES},
                "fd_kinds_start": fds_at_start,
                "fd_kinds_end": {n: fd_kinds(daemons.pid(n)) for n in NODES},
                "cache_images": {
                    n: len(list((daemons.dir(n) / "state" / "cache" / "images").iterdir()))
                    for n in NODES
                },
            }
        except BaseException:
            for name in NODES:
                if name in daemons.procs:
                    sys.stderr.write(f"--- {name} log ---\n{daemons.log_tail(name)}\n")
            raise
        finally:
            daemons.close()
            # What the stopped daemons left (before the last-resort clean-up).
            after_stop = {"mounts": mounts_under(top), "loops": loops_under(top)}
            _force_clean(top)
        final["after_stop"] = after_stop
    return {
        "cycles": cycles,
        "warmup": WARMUP,
        "gc_every": GC_EVERY,
        "image_sizes_mib": sorted({(IMAGE_MIN + k * IMAGE_STEP) // MiB for k in range(5)}),
        "chunk_size": CHUNK_SIZE,
        "daemon_malloc_env": malloc_env,
        "seconds_total": round(time.monotonic() - started, 2),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "mem_total_kib": _mem_total_kib(),
        },
        "bounds": {
            "fd_slack": FD_SLACK,
            "rss_growth_kib": RSS_GROWTH_KIB,
            "thread_slack": THREAD_SLACK,
        },
        "nodes": series,
        "per_cycle": per_cycle,
        "final": final,
    }


def _mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def baseline_index(result: dict[str, Any]) -> int:
    """The reading the end is compared with: right after the first gc past the warm-up."""
    warmup, every = int(result["warmup"]), int(result["gc_every"])
    first_gc_after = -(-warmup // every) * every  # cycles are 1-based here
    return first_gc_after - 1


def violations(result: dict[str, Any]) -> list[str]:
    """Every bound the run broke, each with its figures; empty when nothing leaked."""
    found = []
    base = baseline_index(result)
    final = result["final"]
    for name, s in result["nodes"].items():
        fds0, fds1 = s["fds"][base], s["fds"][-1]
        if fds1 > fds0 + FD_SLACK:
            found.append(
                f"{name}: {fds1} fds at the end, {fds0} after the warm-up (slack {FD_SLACK}):"
                f" {final['fd_kinds_start'][name]} -> {final['fd_kinds_end'][name]}"
            )
        rss0, rss1 = s["rss_kib"][base], s["rss_kib"][-1]
        if rss1 - rss0 > RSS_GROWTH_KIB:
            found.append(f"{name}: RSS grew {rss1 - rss0} KiB after the warm-up ({rss0} -> {rss1})")
        th0, th1 = s["threads"][base], s["threads"][-1]
        if th1 > th0 + THREAD_SLACK:
            found.append(f"{name}: {th1} threads at the end, {th0} after the warm-up")
        if any(s["children"]):
            found.append(f"{name}: child processes after cycles {s['children']}")
    for key in ("mounts", "loops", "staged"):
        if any(result["per_cycle"][key]) or final[key]:
            found.append(f"{key} left after a cycle: {result['per_cycle'][key]}; end: {final[key]}")
    if any(final["after_stop"].values()):
        found.append(f"left after the daemons stopped: {final['after_stop']}")
    if any(final["children"].values()):
        found.append(f"child processes at the end: {final['children']}")
    if any(final["cache_images"].values()):
        found.append(f"images left in the caches after the last gc: {final['cache_images']}")
    return found


def summary(result: dict[str, Any]) -> str:
    base = baseline_index(result)
    lines = [f"{result['cycles']} cycles in {result['seconds_total']} s"]
    for name, s in result["nodes"].items():
        lines.append(
            f"{name}: fds {s['fds'][0]} / {s['fds'][base]} / {s['fds'][-1]} (max {max(s['fds'])}),"
            f" RSS KiB {s['rss_kib'][0]} / {s['rss_kib'][base]} / {s['rss_kib'][-1]}"
            f" (max {max(s['rss_kib'])}), threads {s['threads'][0]} / {s['threads'][base]}"
            f" / {s['threads'][-1]}  [cycle 1 / after warm-up / end]"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--out", type=Path, help="write the measured series here (JSON)")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="run the daemons with glibc's default malloc settings (RSS is noisy then)",
    )
    args = parser.parse_args(argv)
    result = run(args.cycles, pinned_malloc=not args.default_malloc)
    result["violations"] = violations(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    for v in result["violations"]:
        print("LEAK:", v)
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
