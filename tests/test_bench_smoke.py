"""The ingest benchmark's machinery, for about a second with tiny sizes, so bench/ cannot rot.

No assertion on speed: only that the run completes and its JSON line has the keys, with
positive numbers.
"""

from __future__ import annotations

import json

import pytest

from bench import ingest

KEYS = ("leads_per_s", "ceiling_per_s", "ratio", "p99_ms", "p50_ms", "batch_leads_per_s",
        "batch_ratio")


def test_ingest_benchmark_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = ingest.run(duration=0.5, single_leads=400, batches=20, batch_size=10, warmup=50,
                        quiet=True)
    ingest.report(result)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    line = json.loads(last)
    for key in KEYS:
        assert isinstance(line[key], int | float) and line[key] > 0, key
    machine = line["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and "cpu" in machine
    assert line["errors"] == 0


def test_lua_instructions_count() -> None:
    """``python -m bench lua --instructions`` with two counted calls (valgrind starts the
    redis-server slowly: a few seconds)."""
    import shutil

    from bench import lua_instructions

    if not shutil.which("valgrind"):
        pytest.skip("valgrind not installed (Debian: apt-get install valgrind)")
    result = lua_instructions.run(2, quiet=True)
    assert result is not None and result["lua_instructions_per_lead"] > 0
