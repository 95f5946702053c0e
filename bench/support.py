"""What the benchmarks share: a typed view of the fixture and rate reporting.

pytest-benchmark's fixture has no type hints, so the benchmarks annotate it
with ``Benchmark``, the part of its interface they use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Rates are in decimal megabytes per second, as link speeds are quoted.
MB = 1_000_000
MiB = 1024 * 1024


class Benchmark(Protocol):
    """The ``benchmark`` fixture of pytest-benchmark (the part used here)."""

    extra_info: dict[str, Any]
    #: Timing statistics after the run; None when benchmarks are disabled.
    stats: Any

    def __call__(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    def pedantic(
        self,
        target: Callable[..., T],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        setup: Callable[[], object] | None = None,
        teardown: Callable[[], object] | None = None,
        rounds: int = 1,
        warmup_rounds: int = 0,
        iterations: int = 1,
    ) -> T: ...


def median_seconds(benchmark: Benchmark) -> float | None:
    """Median time of one call, or None if the benchmark did not time anything
    (run without --benchmark-enable, the function ran once as a plain test)."""
    stats = getattr(benchmark.stats, "stats", None)
    return None if stats is None else float(stats.median)


def record_rate(benchmark: Benchmark, amount: float, unit: str) -> None:
    """Store ``amount`` per median call as ``extra_info[unit]`` (e.g. "MB/s")."""
    seconds = median_seconds(benchmark)
    if seconds:
        benchmark.extra_info[unit] = round(amount / seconds, 1)


def record_mb_per_s(benchmark: Benchmark, nbytes: int) -> None:
    record_rate(benchmark, nbytes / MB, "MB/s")
