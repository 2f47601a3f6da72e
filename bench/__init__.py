"""Benchmarks (functions, not tests): ``python -m bench.<name>``."""
