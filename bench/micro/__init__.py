"""pytest-benchmark micro-benchmarks, opt-in (see test_micro.py for the command)."""
