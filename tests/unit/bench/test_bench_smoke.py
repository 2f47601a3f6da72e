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


def test_engine_instructions_driver(tmp_path) -> None:
    """``python -m bench ingest --instructions`` counts what its child does under callgrind:
    that child (the service in-process, single posts and a batch through the ASGI app) is
    run here without valgrind, with a few leads, so it cannot rot (valgrind takes ~15 s to
    start Python: the count itself is left to the benchmark)."""
    import pickle

    from bench import common, ingest_instructions

    cfg = common.load_config()
    work = {"single": common.single_bodies(cfg, 5, seed=1),
            "batch": common.batch_bodies(cfg, 1, 3, seed=2, start=1_000)}
    with common.funded_redis(cfg) as srv:
        for mode, bodies in work.items():
            path = tmp_path / f"{mode}.pickle"
            path.write_bytes(pickle.dumps(bodies))
            ingest_instructions.child(mode, srv.url, str(path), len(bodies))


def test_target_bound_reads_both_targets_against_decide_lua() -> None:
    """``bench all``'s bound row: ratio 0.5 of a 40k ceiling and batch 3x that single rate
    need 60k batch leads/s; a decide.lua that does 15k alone leaves a headroom of 0.25."""
    from bench.__main__ import rows, target_bound

    ingest = {"ceiling_per_s": 40_000.0, "targets": {"ratio": 0.5, "p99_ms": 10.0,
                                                     "batch_ratio": 3.0}}
    lua = {"leads_per_s": 15_000.0, "leads_per_call": 16, "pipeline": 16, "clients": 8}
    bound = target_bound({"ingest": ingest, "lua": lua})
    assert bound == {"single_needed_per_s": 20_000.0, "batch_needed_per_s": 60_000.0,
                     "lua_per_s": 15_000.0, "headroom": 0.25}
    assert target_bound({"lua": lua}) is None
    assert target_bound({"ingest": {"error": "x"}, "lua": lua}) is None
    # history only (#16 retired both targets): in the JSON, no longer a row of the table
    table = rows({"lua": lua, "ingest": ingest_row(ingest)})
    assert not [r for r in table if r[0].startswith("ingest targets")]
    assert [r[4] for r in table if r[0].startswith("ingest")] == ["— (retired: #16)"] * 2


def ingest_row(ingest: dict) -> dict:
    """An ingest result with every figure rows() prints."""
    figures = {"leads_per_s": 6_000.0, "ratio": 0.15, "p50_ms": 9.0, "p99_ms": 19.0,
               "ceiling_p99_ms": 3.0, "batch_size": 100, "batch_concurrency": 8,
               "batch_leads_per_s": 12_000.0, "batch_ratio": 2.0}
    return {**ingest, **figures}
