"""Reusable helpers of the cartd tests and benchmarks: the real peers, started and cleaned up, and fakes."""
