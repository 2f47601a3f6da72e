"""Benchmarks, opt-in and kept apart from the tests: ``python -m bench all`` or ``NAME``."""
