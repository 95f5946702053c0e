"""Benchmark session set-up: a shared source file for the link benchmarks, and
machine/commit notes in the JSON results."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.rawpair import LINK_BYTES, make_source

ROOT = Path(__file__).resolve().parent.parent

#: How busy the machine was, for the "machine_info" of the JSON results.
_load: dict[str, Any] = {}
_start: dict[str, float] = {}


def _cpu_jiffies() -> tuple[int, int, int]:
    """(total, busy, steal) clock ticks of all CPUs since boot, from /proc/stat.

    Busy is user + nice + system time. Interrupt and softirq time is left out
    of busy: the kernel charges the loopback benchmark's own packet processing
    there, not to this process. Steal is time the hypervisor gave to others.
    """
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = ticks
    return sum(ticks), user + nice + system, steal


def _own_cpu_seconds() -> float:
    """CPU time of this process and its waited-for children."""
    own = os.times()
    return own.user + own.system + own.children_user + own.children_system


def _percent(part: float, whole: float) -> float:
    return round(max(0.0, 100 * part / whole), 1) if whole > 0 else 0.0


def pytest_configure(config: pytest.Config) -> None:
    _load["loadavg_before_run"] = [round(x, 2) for x in os.getloadavg()]
    if not os.path.exists("/proc/stat"):
        return
    # One idle second first: the share of the CPUs that the rest of the
    # machine used while we slept.
    total0, busy0, _ = _cpu_jiffies()
    time.sleep(1.0)
    total1, busy1, _ = _cpu_jiffies()
    _load["cpu_busy_percent_before_run"] = _percent(busy1 - busy0, total1 - total0)
    _start["total"], _start["busy"], _start["steal"] = _cpu_jiffies()
    _start["own"] = _own_cpu_seconds()


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["cpus_usable"] = len(os.sched_getaffinity(0))
    machine_info.update(_load)
    if _start:
        # CPU used during the run by anything but this benchmark process, as a
        # share of all CPUs: near 0 means the figures had the machine alone.
        total, busy, steal = _cpu_jiffies()
        own = (_own_cpu_seconds() - _start["own"]) * os.sysconf("SC_CLK_TCK")
        span = total - _start["total"]
        machine_info["other_cpu_percent_during_run"] = _percent(busy - _start["busy"] - own, span)
        machine_info["steal_percent_during_run"] = _percent(steal - _start["steal"], span)


#: Rounds kept as raw timings in the JSON; beyond this only the statistics
#: are kept (a fast benchmark runs 100,000 rounds: megabytes of numbers).
KEEP_DATA_ROUNDS = 20


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
) -> None:
    for bench in output_json["benchmarks"]:
        stats = bench["stats"]
        if len(stats.get("data", ())) > KEEP_DATA_ROUNDS:
            del stats["data"]


def pytest_benchmark_generate_commit_info(config: pytest.Config) -> dict[str, Any]:
    """pytest-benchmark's own version runs `git describe --dirty`, which may
    rewrite the index; this one only reads (GIT_OPTIONAL_LOCKS=0)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        return {
            "id": git("rev-parse", "HEAD"),
            "time": git("show", "-s", "--format=%cI", "HEAD"),
            "author_time": git("show", "-s", "--format=%aI", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "project": "p2pcast",
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"id": "unversioned", "dirty": False, "project": "p2pcast", "branch": "(unknown)"}


@pytest.fixture(scope="session")
def link_source() -> Iterator[tuple[str, int]]:
    """(path, size): the file the link benchmarks send, made once per session."""
    path = make_source(LINK_BYTES)
    try:
        yield path, LINK_BYTES
    finally:
        os.unlink(path)
