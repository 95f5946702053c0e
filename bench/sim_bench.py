"""Discrete-event benchmark: the real scheduler over modelled links, N = 16 ... 4096.

Runs p2pcast.sim (the sans-IO Swarm of every node, on a fake clock, over the
overlay's partial views) for each cluster size and reports the time to the
first, median and last node against the floor S/B, and how much the origin
served. Every figure is simulated time, deterministic for a given seed; the
wall-clock seconds and event counts measure the simulator itself.

    python -m bench.sim_bench --nodes 16,64,256,1024,4096 --size 1G \\
        --chunk-size 4M --rate 100mbit --origin-rate 1000mbit --latency-ms 0.1 \\
        --out bench/results/sim.json --plot
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from p2pcast import overlay, swarm
from p2pcast.cli import parse_size
from p2pcast.publish import auto_chunk_size
from p2pcast.sim import TCP_GOODPUT, SimSpec, simulate
from p2pcast.swarm import SwarmConfig
from tools.cluster import parse_rate

#: The issue's target for 4096 nodes: the last node within 1.25 x S/B.
TARGET_RATIO = 1.25


def run_one(spec: SimSpec) -> dict[str, Any]:
    started = time.process_time()
    result = simulate(spec)
    cpu = time.process_time() - started
    times = sorted(result.finish_times.values())
    return {
        "nodes": spec.nodes,
        "finished": len(times),
        "aborted": len(result.aborted),
        "first_seconds": times[0],
        "median_seconds": statistics.median(times),
        "last_seconds": times[-1],
        "first_ratio": times[0] / spec.floor,
        "median_ratio": statistics.median(times) / spec.floor,
        "last_ratio": result.ratio,
        "origin_ratio": result.origin_bytes / spec.image_size,
        "sim_cpu_seconds": cpu,
        "events": result.events,
    }


def plot(result: dict[str, Any], out: Path) -> Path:
    """last/floor vs N (band: first..last node), with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(result["runs"], key=lambda r: r["nodes"])
    ns = [r["nodes"] for r in runs]
    p = result["params"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    (line,) = ax.plot(ns, [r["last_ratio"] for r in runs], marker="o", label="last node")
    ax.plot(ns, [r["median_ratio"] for r in runs], marker=".", ls=":", color=line.get_color(),
            label="median node")  # fmt: skip
    ax.fill_between(ns, [r["first_ratio"] for r in runs], [r["last_ratio"] for r in runs],
                    color=line.get_color(), alpha=0.15, label="first..last")  # fmt: skip
    ax.axhline(TARGET_RATIO, color="r", ls="--", label=f"target {TARGET_RATIO} x S/B")
    ax.axhline(1 / p["goodput"], color="grey", ls=":", label="S / (B x goodput)")
    ax.axhline(1.0, color="k", ls="--", label="floor S/B")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("nodes N")
    ax.set_ylabel("time / floor S/B")
    ax.set_title(
        f"simulated: {p['size_human']} image, {p['chunk_human']} chunks, links {p['rate']}, "
        f"origin {p['origin_rate']}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="16,64,256,1024,4096", help="comma-separated N")
    parser.add_argument("--size", default="1G", help="image size (K/M/G, powers of 2)")
    parser.add_argument(
        "--chunk-size", default="auto", help="default: as push chooses it for --size"
    )
    parser.add_argument("--rate", default="100mbit", help="every node's link, each way")
    parser.add_argument("--origin-rate", default="1000mbit", help="the origin's uplink")
    parser.add_argument("--latency-ms", type=float, default=0.1, help="one way")
    parser.add_argument("--goodput", type=float, default=TCP_GOODPUT)
    parser.add_argument(
        "--initial-rate",
        default=None,
        help="SwarmConfig.initial_rate, the rate assumed before any chunk is measured "
        "(default: --rate, as an operator would set it)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sim.json"))
    parser.add_argument("--plot", action="store_true", help="also write <out>.png")
    args = parser.parse_args(argv)

    size = parse_size(args.size)
    chunk = auto_chunk_size(size) if args.chunk_size == "auto" else parse_size(args.chunk_size)
    link = parse_rate(args.rate) / 8
    origin = parse_rate(args.origin_rate) / 8
    nodes = [int(n) for n in args.nodes.split(",")]
    initial = parse_rate(args.initial_rate) / 8 if args.initial_rate else link
    config = SwarmConfig(initial_rate=initial)
    params = {
        "size": size,
        "size_human": args.size,
        "chunk_size": chunk,
        "chunk_human": f"{chunk >> 20}M" if chunk >= 1 << 20 else f"{chunk >> 10}K",
        "chunks": -(-size // chunk),
        "rate": args.rate,
        "origin_rate": args.origin_rate,
        "link_bytes_per_s": link,
        "origin_bytes_per_s": origin,
        "latency_ms": args.latency_ms,
        "goodput": args.goodput,
        "seed": args.seed,
        "config": dataclasses.asdict(config),
        "overlay_degree": overlay.DEGREE,
        "overlay_full_mesh": overlay.FULL_MESH,
        "max_owners": swarm.MAX_OWNERS,
        "floor_seconds": size / link,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    runs = []
    print(" nodes   first  median    last  last/S/B  origin/S   sim cpu s    events")
    for n in nodes:
        spec = SimSpec(
            nodes=n,
            image_size=size,
            chunk_size=chunk,
            link_rate=link,
            origin_rate=origin,
            latency=args.latency_ms / 1000,
            seed=args.seed,
            goodput=args.goodput,
            config=config,
        )
        r = run_one(spec)
        runs.append(r)
        print(
            f"{n:6d} {r['first_seconds']:7.2f} {r['median_seconds']:7.2f} {r['last_seconds']:7.2f}"
            f" {r['last_ratio']:9.3f} {r['origin_ratio']:9.3f} {r['sim_cpu_seconds']:11.1f}"
            f" {r['events']:9d}",
            flush=True,
        )
    result = {"params": params, "target_ratio": TARGET_RATIO, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        try:
            path = plot(result, args.out)
        except ImportError:
            print("matplotlib is not installed (pip install .[bench]): no plot", file=sys.stderr)
        else:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
