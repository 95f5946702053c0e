"""Cluster benchmark: one image to N emulated nodes on shaped links, four ways.

    .venv/bin/python -m bench.cluster_bench --nodes 2,4,8 --rate 400mbit --size 256M \\
        --methods p2pcast,http,chain,aria2 --out bench/results/cluster.json [--plot]

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
from p2pcast.cli import parse_size
from p2pcast.demo import make_image
from p2pcast.hashing import file_sha256
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from tools.cluster import Cluster, format_rate, parse_rate

HTTP_PORT = 8080
IMAGE_REF = ImageRef("bench", "latest")
DEFAULT_NAME = "cbench"
DEFAULT_SUBNET = "198.18.9.0/24"
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


def prepare_image(work: Path, size: int, kind: str, chunk_size: int) -> dict[str, Any]:
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
        "chunk_size": chunk_size,
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


def summarize(
    method: str, n: int, repeat: int, run: cm.MethodRun, ok: dict[str, bool], image: dict[str, Any],
    floor: float, wire: int,
) -> dict[str, Any]:  # fmt: skip
    times = sorted(run.seconds.values())
    size = image["size"]
    nodes = {
        node: {"seconds": round(run.seconds[node], 4), "sha256_ok": ok[node]}
        | run.extra.get("nodes", {}).get(node, {})
        for node in sorted(run.seconds, key=lambda s: int(s[1:]))
    }
    record: dict[str, Any] = {
        "method": method,
        "nodes": n,
        "repeat": repeat,
        "ok": all(ok.values()),
        "verified": sum(ok.values()),
        "first_seconds": round(times[0], 3),
        "median_seconds": round(statistics.median(times), 3),
        "last_seconds": round(times[-1], 3),
        "first_ratio": round(times[0] / floor, 3),
        "median_ratio": round(statistics.median(times) / floor, 3),
        "last_ratio": round(times[-1] / floor, 3),
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
        record["last_ratio_stored"] = round(times[-1] / stored_floor, 3)
    if "piece_length" in run.extra:  # aria2
        record["piece_length"] = run.extra["piece_length"]
    return record


def run_n(
    args: argparse.Namespace, n: int, image: dict[str, Any], work: Path
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    floor = image["size"] / (parse_rate(args.rate) / 8)
    say = print if not args.quiet else (lambda *a, **k: None)
    with Cluster.up(n, args.rate, args.origin_rate, name=args.name, subnet=args.subnet) as cluster:
        origin_ip = cluster.origin_address
        with open(work / f"http-server-{n}.log", "wb") as log:
            server = cluster.popen(
                "origin",
                [sys.executable, "-m", "http.server", "--bind", origin_ip, str(HTTP_PORT),
                 "--directory", image["origin_dir"]],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            _wait_port(origin_ip, HTTP_PORT)
            for repeat in range(args.repeat):
                for method in args.methods:
                    mwork = work / "runs" / f"{method}-n{n}-r{repeat}"
                    mwork.mkdir(parents=True)
                    setup = cm.Setup(
                        cluster=cluster,
                        origin_url=f"http://{origin_ip}:{HTTP_PORT}",
                        origin_dir=Path(image["origin_dir"]),
                        image=Path(image["path"]),
                        image_ref=str(IMAGE_REF),
                        size=image["size"],
                        work=mwork,
                        timeout=args.timeout,
                        piece_length=parse_size(args.piece_length),
                        verbose=args.keep_logs is not None,
                    )
                    time.sleep(args.settle)
                    wire0 = cm.origin_tx_bytes(cluster)
                    try:
                        run = cm.METHODS[method](setup, cm.CpuMeter(cluster))
                        wire = cm.origin_tx_bytes(cluster) - wire0
                        ok = _verify(run.paths, image["sha256"])
                        rec = summarize(method, n, repeat, run, ok, image, floor, wire)
                    except Exception as exc:  # one failed method does not end the run
                        rec = {"method": method, "nodes": n, "repeat": repeat, "ok": False,
                               "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                    finally:
                        if args.keep_logs is not None:
                            _keep_logs(mwork, Path(args.keep_logs) / mwork.name)
                        shutil.rmtree(mwork, ignore_errors=True)
                    records.append(rec)
                    say(_row(rec), flush=True)
        finally:
            cm._stop([server])
    return records


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


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['method']:8s} {r['nodes']:3d}  FAILED: {r['error']}"
    origin = "?" if r["origin_ratio"] is None else f"{r['origin_ratio']:.2f}x"
    return (
        f"{r['method']:8s} {r['nodes']:3d} {r['first_seconds']:7.2f} {r['median_seconds']:7.2f} "
        f"{r['last_seconds']:7.2f} {r['last_ratio']:7.2f} {origin:>7s} "
        f"{r['origin_wire_ratio']:5.2f}x {r['cpu_seconds']:7.1f} {r['cpu_cores']:5.2f} "
        f"{r['machine_busy_pct']:6.1f}  {r['verified']}/{r['nodes']} ok"
    )


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """time vs N (last node, band first..last, the floor) and last/floor vs N, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    floor = result["floor_seconds"]
    p = result["params"]
    title = f"{p['size_human']} image, links {p['rate']} (floor S/B = {floor:.2f} s)"
    written = []
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
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--piece-length", default="1M", help="aria2: the torrent's piece length")
    ap.add_argument("--methods", default="p2pcast,http,chain")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default="bench/results/cluster.json")
    ap.add_argument("--plot", action="store_true", help="also write OUT_time.png, OUT_ratio.png")
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
    counts = [int(x) for x in args.nodes.split(",")]
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
    try:
        image = prepare_image(work, size, args.image_kind, parse_size(args.chunk_size))
        floor = image["size"] / (rate / 8)
        if not args.quiet:
            print(
                f"image {image['size']} B ({image['stored']} stored, {image['chunks']} chunks), "
                f"links {format_rate(rate)}, floor S/B = {floor:.2f} s\n{HEADER}",
                flush=True,
            )
        runs: list[dict[str, Any]] = []
        for n in counts:
            runs += run_n(args, n, image, work)
    finally:
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
            "methods": args.methods,
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
    return 0 if all(r.get("ok") for r in runs) else 1


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
