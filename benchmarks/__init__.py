"""Benchmark scripts and the real-data fetcher used by tests and benchmarks."""
