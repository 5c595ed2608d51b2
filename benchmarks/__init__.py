"""Throughput scripts: `python -m benchmarks.NAME` prints one JSON line per measurement."""
