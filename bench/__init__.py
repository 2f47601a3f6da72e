"""Benchmark harness: an out-of-process HTTP load generator and a null endpoint ceiling."""
