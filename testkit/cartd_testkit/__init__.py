"""Reusable helpers that start and clean up the real peers used by the cartd tests and benchmarks."""
