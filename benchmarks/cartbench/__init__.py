"""Benchmark of pacifica-cartd against its physical limits and the published 0.7.0 (see benchmarks/README.md)."""
