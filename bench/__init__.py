"""Benchmarks, opt-in and apart from the tests: ``python -m bench all`` or ``python -m bench NAME``."""
