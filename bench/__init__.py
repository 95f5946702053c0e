"""Micro-benchmarks (pytest-benchmark); run them with bench/run.sh."""
