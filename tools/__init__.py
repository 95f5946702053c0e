"""Developer tools; `tools.cluster` is importable by tests and benchmarks."""
