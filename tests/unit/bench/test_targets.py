"""Issue #16's measurements: their parsing, ratio and table logic, with made-up figures or
tiny real runs (a second or two each). No long benchmark and no speed assertion here."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import redis

from bench import common, ingest_instructions, loadgen, nullapp, openloop, redis_memory
from bench.__main__ import TARGETS, rows, targets


def _results() -> dict:
    ladder = [openloop.ladder_row(f, 1000 * f, loadgen.LoadResult(
        requests=10, errors=0, elapsed_s=1.0, rps=1000 * f, p50_ms=2.0, p99_ms=4.0 + 10 * f,
        max_ms=20.0, p999_ms=12.0 + f, status_counts={200: 10}, cpu_s=0.1, cpu_util=0.1))
        for f in openloop.LADDER]
    return {
        "ingest": {"leads_per_s": 6_000.0, "ceiling_per_s": 40_000.0, "ratio": 0.15,
                   "p50_ms": 9.0, "p99_ms": 19.0, "ceiling_p99_ms": 3.0, "batch_size": 100,
                   "batch_concurrency": 8, "batch_leads_per_s": 12_000.0, "batch_ratio": 2.0,
                   "targets": {"ratio": 0.5, "p99_ms": 10.0, "batch_ratio": 3.0},
                   "engine_instructions_per_lead": 190_000,
                   "engine_instructions_per_batch_lead": 170_000,
                   "buyers_growth": 3.5,
                   "engine_instructions_per_lead_by_buyers": {"1": 200_000, "200": 700_000}},
        "openloop": {"closed_loop_per_s": 3_000.0, "closed_loop_p99_ms": 40.0,
                     "ladder": ladder, "peer_per_s": 1_000.0, "peer_p99_ms": 90.0,
                     **openloop.figures(3_000.0, 1_000.0, ladder)},
        "lua": {"leads_per_s": 15_000.0, "leads_per_call": 16, "pipeline": 16, "clients": 8,
                "ratio": None, "compared_campaign": "solar", "decide_sold_leads_per_s": 10.0,
                "minimal_sold_leads_per_s": 30.0, "minimal_over_decide_rate": 3.0,
                "lua_instructions_per_lead": 570_000, "lua_instruction_calls": 150,
                "decide_vs_minimal": 2.6, "decide_instructions_per_sold_lead": 480_000,
                "minimal_instructions_per_sold_lead": 185_000,
                "decide_writes_per_sold_lead": {"xadd": 3.0, "set": 3.0},
                "minimal_writes_per_sold_lead": {"xadd": 1.0, "set": 3.0},
                "decide_aof_bytes_per_sold_lead": 2055, "minimal_aof_bytes_per_sold_lead": 1039,
                "decide_vs_minimal_campaign": "solar"},
        "redis_memory": {"sold": 900, "redis_bytes_per_lead": 450.0,
                         "bytes_per_sold_lead_by_kind": {"dedupe": 300.0, "other": 0.2},
                         "steady_state_gb_1m_per_day": 9.0},
    }


def test_targets_reads_every_key_and_judges_it() -> None:
    t = targets(_results())
    assert set(TARGETS) <= set(t)
    assert t["open_loop_p99_ms"] == 9.0  # the ladder's 50 % step: 4 + 10 * 0.5
    assert t["peer_ratio"] == 3.0
    assert t["met"] == {"decide_vs_minimal": False, "redis_bytes_per_lead": True,
                        "engine_instructions_per_lead": True, "buyers_growth": False,
                        "open_loop_p99_ms": True, "peer_ratio": False}
    assert t["targets"]["peer_ratio"] == ">= 4"
    # a failed or missing stage: None, neither met nor missed
    failed = targets({"lua": {"error": "boom"}})
    assert failed["decide_vs_minimal"] is None and failed["met"]["decide_vs_minimal"] is None
    json.dumps(t)


def test_rows_show_each_target_once() -> None:
    table = rows(_results())
    for key in TARGETS:
        assert len([r for r in table if r[0].startswith(key)]) == 1, key
    [peer] = [r for r in table if r[0].startswith("peer_ratio")]
    assert (peer[3], peer[5]) == ("3.00", "**no**")


def test_open_loop_figures() -> None:
    assert openloop.at_target([{"fraction": 0.25, "p99_ms": 1.0}]) is None
    assert openloop.figures(100.0, 0.0, []) == {"open_loop_p99_ms": None, "peer_ratio": None}
    assert openloop.figures(300.0, 100.0, [{"fraction": 0.5, "p99_ms": 7.5}]) == {
        "open_loop_p99_ms": 7.5, "peer_ratio": 3.0}


def test_open_loop_load_generator_keeps_its_schedule() -> None:
    """200 requests a second for a second: about 200 sent, each timed from when it was
    due; the null app answers them all."""
    with nullapp.serve("bench.nullapp:app") as url:
        r = loadgen.run(url + "/v1/leads", method="POST", bodies=[b"{}"], concurrency=8,
                        duration=1.0, rate=200.0)
    assert 195 <= r.requests <= 201 and r.errors == 0
    assert r.p999_ms >= r.p99_ms >= r.p50_ms > 0
    with pytest.raises(ValueError, match="open-loop"):
        loadgen.run("http://127.0.0.1:1/", requests=1, rate=10.0)


def test_redis_memory_kinds_and_steady_state() -> None:
    assert redis_memory.kind("lf:{acme}:idem:p:abc") == "idempotency"
    assert redis_memory.kind("lf:{acme}:dup:0f1e") == "dedupe"
    assert redis_memory.kind("lf:{acme}:lead:018f") == "sale record"
    assert redis_memory.kind("lf:{acme}:dlog:018f") == "delivery log"
    assert redis_memory.kind("lf:{acme}:dstate:018f") == "delivery state"
    assert redis_memory.kind("lf:{acme}:ledger") == "ledger stream"
    assert redis_memory.kind("lf:{acme}:events") == "events stream"
    assert redis_memory.kind("lf:{acme}:acct:wallet") == "other"
    before = {"dedupe": {"keys": 0, "bytes": 100}}
    after = {"dedupe": {"keys": 20, "bytes": 3_300}, "idempotency": {"keys": 10, "bytes": 2_000},
             "other": {"keys": 3, "bytes": 50}}
    per = redis_memory.per_lead(before, after, 10)
    assert per == {"dedupe": 320.0, "idempotency": 200.0, "other": 5.0}
    steady = redis_memory.steady_state(per, leads_per_day=1_000)
    # dedupe lives 30 days, idempotency 1; "other" is not per lead
    assert steady == {"dedupe": 320.0 * 1_000 * 30, "idempotency": 200.0 * 1_000,
                      "total": 320.0 * 1_000 * 30 + 200.0 * 1_000}


def test_wait_drained_sees_pending_and_lag() -> None:
    cfg = common.load_config()
    with common.funded_redis(cfg, persistent=False) as srv:
        r = redis.Redis(port=srv.port)
        try:
            s = "lf:{acme}:deliveries"
            r.xgroup_create(s, "g", id="0", mkstream=True)
            r.xadd(s, {"a": "1"})
            with pytest.raises(TimeoutError, match="not drained"):
                redis_memory.wait_drained(r, ["acme"], timeout=0.2, settle=0.0)
            [[_, entries]] = r.xreadgroup("g", "c", {s: ">"})
            r.xack(s, "g", *[e[0] for e in entries])
            assert redis_memory.wait_drained(r, ["acme"], timeout=5, settle=0.0) >= 0
        finally:
            r.close()


def test_growth_config_has_every_buyer_eligible() -> None:
    from engine.routing.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        cfg = common.load_config(ingest_instructions.growth_config(200, Path(tmp)))
        bodies = ingest_instructions.growth_bodies(cfg, 5)
    plan = Runtime(cfg).campaigns[ingest_instructions.GROWTH_CAMPAIGN]
    assert len(plan.buyers) == 200 and plan.buyers[0].priority == 1
    assert {b.priority for b in plan.buyers[1:]} == {2}
    assert len(bodies) == 5 and all(b"growth" in b for b in bodies)


def test_minimal_script_sells_each_lead_once() -> None:
    """bench/minimal.lua on one call of 16 solar leads: every lead sold with its writes
    (1 XADD, 1 HINCRBY, 3 SET), then the same call replayed sells nothing."""
    from bench import lua_instructions
    from bench.lua import MINIMAL
    from engine.core import keys

    cfg = common.load_config()
    tenant, [argv] = lua_instructions._calls(cfg, 1, campaign="solar")
    prefix = keys.tenant_prefix(tenant)
    with common.funded_redis(cfg, persistent=False) as srv:
        r = redis.Redis(port=srv.port)
        try:
            sha = r.script_load(MINIMAL.read_text())
            first = json.loads(r.evalsha(sha, 1, prefix, *argv))["r"]
            assert [d["s"] for d in first] == ["ACCEPTED"] * 16
            assert r.xlen(prefix + "sales") == 16
            again = json.loads(r.evalsha(sha, 1, prefix, *argv))["r"]
            assert {d["s"] for d in again} == {"DUPLICATED"} and r.xlen(prefix + "sales") == 16
        finally:
            r.close()
