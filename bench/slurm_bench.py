"""Slurm benchmark: from `sbatch` to the job's tasks running inside its image, three ways.

    .venv/bin/python -m bench.slurm_bench --nodes 2,4,8 --rate 100mbit --origin-rate 400mbit \\
        --pad 200M --out bench/results/slurm.json [--plot]

A real Debian image (tools/testimage.py, padded with --pad of random bytes to
a size that matters) is pushed as SquashFS to a real Ceph on the host (S3
through radosgw, bench/ceph_origin.py). For every method and N a fresh Slurm
cluster of N nodes is built (tools/slurm.py: slurmctld, a slurmd and a p2pcast
daemon per node, every node's link shaped to --rate both ways, the host's
traffic into the nodes' bridge, where Ceph's replies go, to --origin-rate), so
that no cache survives from one run to the next. Then, as the unprivileged
test user, one batch job whose single step runs a task per node inside the
image, writing the time from there (``date +%s.%N``, only if the image's
marker file is there) into a directory bind-mounted from the host:

- ``p2pcast``: ``sbatch --ch-image=NAME --ch-mount=DIR:/mnt``; the Prolog asks
  each node's daemon to broadcast the image from Ceph and mount it; the step's
  tasks run in it through the SPANK plugin (``ch-run`` on the kernel mount);
- ``sbcast``: the batch script, on the first node, GETs the image from Ceph
  (curl, SigV4), Slurm's ``sbcast`` copies it to every node's /tmp, then
  ``srun ch-run IMAGE.sqfs`` (ch-run mounts it with its own SquashFUSE);
- ``http`` (the status quo): ``srun`` GETs the whole image from Ceph on every
  node, then runs ``ch-run`` on it.

Reported per method and N: seconds from sbatch to the first and to the last
task running in the image (and each over the floor S/B of moving the image
over one link), what radosgw says it served, and CPU (every process in the
nodes' namespaces, Ceph's daemons, slurmctld and munged). ch-run's SquashFUSE
needs /dev/fuse usable by the user: its mode is set to 0666 for the run and
put back after. Needs root; everything is stopped by PID and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import cluster_methods as cm
from bench.ceph_origin import CephOrigin
from p2pcast.cli import parse_size
from p2pcast.names import ImageRef
from tools import cluster as net
from tools.slurm import TEST_USER, Slurm
from tools.testimage import MARKER, debian_image

METHODS = ("p2pcast", "sbcast", "http")
IMAGE_REF = ImageRef("slurmbench", "sqfs")
RAW_KEY = "raw/slurmbench.sqfs"
DEFAULT_NAME = "sbench"
DEFAULT_SUBNET = "198.18.10.0/24"
#: Where the task's stamp goes inside the image: an empty directory of minbase,
#: so that the read-only SquashFS mount has the mount point already.
STAMP_MOUNT = "/mnt"
#: sbcast's copy and the status quo's download on each node (each node's /tmp is
#: its own in tools/slurm.py's clusters).
NODE_IMAGE = "/tmp/slurmbench.sqfs"
#: The plugin where every node sees it: each node has its own /tmp.
PLUGIN_PARENT = "/var/tmp"


def make_padded_image(work: Path, pad: int) -> Path:
    """The Debian image as SquashFS with PAD bytes of random data in /opt/pad (an
    image of the size users ship; the random part does not compress)."""
    tar, sqfs = debian_image()
    if pad <= 0:
        return sqfs
    root = work / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(tar)], check=True)
    with open(root / "opt" / "pad", "wb") as f:
        left = pad
        while left:
            piece = min(left, 1 << 24)
            f.write(os.urandom(piece))
            left -= piece
    out = work / "image.sqfs"
    subprocess.run(
        ["mksquashfs", str(root), str(out), "-comp", "zstd", "-quiet", "-no-progress"],
        check=True,
    )
    shutil.rmtree(root)
    return out


def _task_command() -> str:
    """The task's shell command, run inside the image: the stamp only where the
    image's marker is, so a task that ran on the host writes nothing."""
    return f'test -f {MARKER} && date +%s.%N > {STAMP_MOUNT}/"$SLURMD_NODENAME"'


def batch_script(method: str, ceph: CephOrigin, stamps: Path) -> str:
    """The job script of METHOD (p2pcast's gets its image from sbatch's options)."""
    task = _task_command()
    in_image = shlex.join(["ch-run", "-b", f"{stamps}:{STAMP_MOUNT}", NODE_IMAGE, "--",
                           "sh", "-c", task])  # fmt: skip
    get = shlex.join(["curl", *cm.CURL_OPTIONS, *ceph.curl_args()])
    if method == "p2pcast":
        body = f"srun sh -c {shlex.quote(task)}"
    elif method == "sbcast":
        body = (
            f"{get} --output /tmp/slurmbench-src.sqfs\n"
            f"sbcast --force /tmp/slurmbench-src.sqfs {NODE_IMAGE}\n"
            f"srun sh -c {shlex.quote(in_image)}"
        )
    elif method == "http":
        body = f"srun sh -c {shlex.quote(f'{get} --output {NODE_IMAGE} && exec {in_image}')}"
    else:
        raise ValueError(f"unknown method {method!r}")
    return f"#!/bin/sh\nset -e\n{body}\n"


@contextlib.contextmanager
def fuse_for_users() -> Iterator[None]:
    """/dev/fuse usable by the test user (ch-run's SquashFUSE) for the run, then back."""
    dev = Path("/dev/fuse")
    mode = dev.stat().st_mode & 0o7777 if dev.exists() else None
    if mode is not None:
        os.chmod(dev, 0o666)
    try:
        yield
    finally:
        if mode is not None:
            os.chmod(dev, mode)


def _stamps(stamps: Path, nodes: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for node in nodes:
        with contextlib.suppress(OSError, ValueError):
            out[node] = float((stamps / node).read_text())
    return out


def run_one(
    args: argparse.Namespace,
    method: str,
    n: int,
    ceph: CephOrigin,
    plugin: Path,
    home: Path,
    floor: float,
) -> dict[str, Any]:
    """METHOD on a fresh N-node Slurm cluster: one job, timed from sbatch."""
    user = pwd.getpwnam(TEST_USER)
    run_dir = home / f"{method}-n{n}"
    stamps = run_dir / "stamps"
    stamps.mkdir(parents=True)
    script = run_dir / "job.sh"
    script.write_text(batch_script(method, ceph, stamps))
    script.chmod(0o700)  # it holds the S3 keys (sbcast, http): the user's eyes only
    for path in (run_dir, stamps, script):
        os.chown(path, user.pw_uid, user.pw_gid)
    slurm = Slurm.up(
        n, name=args.name, subnet=args.subnet, rate=args.rate, ceph=ceph.ceph.name,
        origin=ceph.url, spank=str(plugin),
    )  # fmt: skip
    try:
        network = net.Cluster.attach(args.name)
        network.shape_host(args.origin_rate or args.rate)
        host_daemons = [d["pid"] for d in slurm.daemons() if d.get("node") in (None, "")]

        def also() -> list[int]:
            return ceph.pids() + host_daemons

        sbatch = ["sbatch", f"-N{n}", "--wait", "--output", str(run_dir / "job.out")]
        if method == "p2pcast":
            sbatch += [f"--ch-image={IMAGE_REF}", f"--ch-mount={stamps}:{STAMP_MOUNT}"]
        time.sleep(args.settle)
        before = ceph.counters()
        meter = cm.CpuMeter(network, also)
        meter.start()
        t0 = time.time()
        done = slurm.client(
            [*sbatch, str(script)], user=TEST_USER, capture_output=True, text=True,
            timeout=args.timeout, cwd=run_dir,
        )  # fmt: skip
        wall = time.time() - t0
        cpu = meter.stop()
        served = ceph.counters().minus(before)
    finally:
        stuck = slurm.down()
    seen = _stamps(stamps, list(slurm.nodes))
    record: dict[str, Any] = {
        "method": method,
        "nodes": n,
        "ok": done.returncode == 0 and len(seen) == n and not stuck,
        "tasks_in_image": len(seen),
        "sbatch_returncode": done.returncode,
        "job_seconds": round(wall, 3),
        "ceph": served,
        "origin_bytes": served["rgw_get_bytes"],
        **cpu,
    }
    if seen:
        first, last = min(seen.values()) - t0, max(seen.values()) - t0
        record |= {
            "first_task_seconds": round(first, 3),
            "last_task_seconds": round(last, 3),
            "first_task_ratio": round(first / floor, 3),
            "last_task_ratio": round(last / floor, 3),
            "per_node": {node: round(t - t0, 3) for node, t in sorted(seen.items())},
        }
    if not record["ok"]:
        log = run_dir / "job.out"
        record["error"] = (done.stderr + (log.read_text() if log.exists() else ""))[-2000:]
    return record


def _row(r: dict[str, Any]) -> str:
    first = r.get("first_task_seconds")
    last = r.get("last_task_seconds")
    f = "-" if first is None else f"{first:7.2f} {r['first_task_ratio']:5.2f}"
    l_ = "-" if last is None else f"{last:7.2f} {r['last_task_ratio']:5.2f}"
    return (
        f"{r['method']:8s} {r['nodes']:3d}  {f:>13s}  {l_:>13s}  "
        f"{r['origin_bytes'] / (1 << 20):8.1f} MiB {r['cpu_seconds']:7.1f} "
        f"{r['machine_busy_pct']:5.1f}"
        f"  {r['tasks_in_image']}/{r['nodes']}{'' if r['ok'] else ' FAILED'}"
    )


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    runs = [r for r in result["runs"] if r.get("first_task_seconds") is not None]
    for method in result["params"]["methods"]:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["nodes"])
        if not mine:
            continue
        xs = [r["nodes"] for r in mine]
        line = ax.plot(
            xs, [r["first_task_seconds"] for r in mine], "o-", label=f"{method} first task"
        )
        ax.plot(xs, [r["last_task_seconds"] for r in mine], "s--", color=line[0].get_color(),
                label=f"{method} last task")  # fmt: skip
    floor = result["floor_seconds"]
    ax.axhline(floor, color="black", linestyle=":", label=f"floor S/B = {floor:.1f} s")
    p = result["params"]
    ax.set_title(
        f"sbatch to tasks in the image: {result['image']['size'] / 1e6:.0f} MB SquashFS, "
        f"links {p['rate']}, origin Ceph S3 at {p['origin_rate']}",
        fontsize=9,
    )
    ax.set_xlabel("nodes N")
    ax.set_ylabel("seconds from sbatch")
    ax.set_xscale("log", base=2)
    ax.set_xticks(p["nodes"], [str(n) for n in p["nodes"]])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out.with_name(out.stem + ".png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.slurm_bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--nodes", default="2,4,8")
    ap.add_argument("--rate", default="100mbit", help="every node's link, each way")
    ap.add_argument("--origin-rate", default=None, help="Ceph's replies in total (default --rate)")
    ap.add_argument("--pad", default="200M", help="random bytes added to the image (0: none)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ceph-instance", default=None, metavar="NAME",
                    help="use this running tools/ceph.py instance (left running)")  # fmt: skip
    ap.add_argument("--out", default="bench/results/slurm.json")
    ap.add_argument("--plot", action="store_true", help="also write OUT.png")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per job")
    ap.add_argument("--settle", type=float, default=1.0, help="idle seconds before each job")
    ap.add_argument("--name", default=DEFAULT_NAME, help="Slurm cluster name")
    ap.add_argument("--subnet", default=DEFAULT_SUBNET)
    ap.add_argument("--quiet", action="store_true")
    return ap


def _sigterm(_sig: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks: clusters, Ceph, /dev/fuse


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS]:
        print(f"slurm_bench: unknown methods {bad} (have {', '.join(METHODS)})", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.nodes.split(",")]
    if os.geteuid() != 0:
        print("slurm_bench: needs root (namespaces, Slurm, Ceph)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    say: Callable[..., None] = print if not args.quiet else (lambda *a, **k: None)
    rate = net.parse_rate(args.rate)
    origin_rate = net.parse_rate(args.origin_rate) if args.origin_rate else rate
    user = pwd.getpwnam(TEST_USER)
    home = Path(user.pw_dir) / f"slurmbench-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="p2pcast-sbench-", dir=PLUGIN_PARENT))
    ceph: CephOrigin | None = None
    stored = 0
    runs: list[dict[str, Any]] = []
    began = time.time()
    try:
        subprocess.run(["make", "-C", str(Path(__file__).resolve().parents[1] / "slurm"),
                        f"BUILD={work}"], check=True, capture_output=True)  # fmt: skip
        os.chmod(work, 0o755)
        image = make_padded_image(work, parse_size(args.pad))
        size = image.stat().st_size
        floor = size / (rate / 8)
        ceph = CephOrigin.up(args.ceph_instance, raw_key=RAW_KEY)
        stored = ceph.publish(image, IMAGE_REF, None).stored_total
        home.mkdir(mode=0o755)
        os.chown(home, user.pw_uid, user.pw_gid)
        say(f"image {size} B SquashFS, links {net.format_rate(rate)}, floor S/B = {floor:.2f} s")
        say(f"{'method':8s} {'N':>3s}  {'first task':>13s}  {'last task':>13s}  "
            f"{'from Ceph':>12s} {'CPU s':>7s} {'busy%':>5s}  in image")  # fmt: skip
        with fuse_for_users():
            for n in counts:
                for method in methods:
                    rec = run_one(args, method, n, ceph, work / "spank_p2pcast.so", home, floor)
                    runs.append(rec)
                    say(_row(rec), flush=True)
    finally:
        if ceph is not None:
            ceph.down()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "slurm",
        "started": began,
        "params": {
            "nodes": counts,
            "rate": net.format_rate(rate),
            "origin_rate": net.format_rate(origin_rate),
            "pad": parse_size(args.pad),
            "methods": methods,
        },
        "image": {
            "size": size,
            "stored": stored,  # as p2pcast keeps it: chunks zstd-compressed where it pays
            "kind": "squashfs",
            "base": "debian bookworm minbase + pad",
        },
        "floor_seconds": round(floor, 3),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {out}")
    if args.plot:
        say(f"wrote {plot(result, out)}")
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
