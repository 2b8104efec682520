"""Benchmarks of the gateway: `python -m bench.run` (see bench/README.md)."""
