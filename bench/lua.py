"""The Redis-side ceiling: decide.lua driven directly by ``redis-benchmark``.

``python -m bench lua [--leads-per-call 16] [--duration 10] [--engine-batch-rate R]``

An embedded redis-server (AOF everysec, like production) gets the example config's accounts
(engine.run.provision.provision_accounts, topped up like the ingest run) and decide.lua
(``SCRIPT LOAD`` of engine.store.scripts.scripts().decide.source). A representative ARGV batch of
``--leads-per-call`` leads is built exactly as the engine builds it (engine.run.demo's generator,
the campaign schema, engine.ingest.ingest's ``_lua_lead``: routing plan, candidates, fingerprints).
redis-benchmark then calls ``EVALSHA`` with pipelining (``-P 16 -c 8``); every lead id,
idempotency key and dedupe fingerprint contains ``__rand_int__`` placeholders (``-r``), so
each call decides fresh leads instead of replaying the first result.

Reports decided leads/s, and, given the engine's batch-endpoint rate from the same run
(``python -m bench all`` passes it), engine / this ceiling. The ceiling excludes HTTP, JSON
decoding, validation and routing: it is what Redis alone can decide.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis

from bench import common
from engine.core import keys
from engine.core.constants import WALLET
from engine.ingest.ingest import Ingest, new_lead_id
from engine.routing.runtime import Runtime
from engine.store.lua_protocol import Call, Candidate, LeadCall, decode_lead, decode_reply
from engine.store.scripts import scripts
from engine.store.store import now_ms

RAND = "__rand_int__"
SEED = 44
PIPELINE, CLIENTS = 16, 8
NOTE = "excludes HTTP, JSON decoding, validation and routing (Redis + decide.lua only)"


def representative_leads(cfg: Any, n: int, *, seed: int = SEED, campaign: str | None = None
                         ) -> tuple[str, list[LeadCall], dict[str, Candidate]]:
    """(tenant, ``n`` Lua leads, the candidate table their candidates' keys refer to) of
    valid generated leads of the first tenant, built by the engine's own code path (schema
    validation, routing plan, ``Ingest._lua_lead``); ``campaign``: only that campaign's
    leads that have a candidate (the minimal script's comparison: solar, each sold)."""
    rt = Runtime(cfg)
    ingest = Ingest(lambda: rt, lambda _t: None)  # type: ignore[arg-type,return-value]
    clock = ingest._clock
    tenant = cfg.tenants[0].id
    out: list[LeadCall] = []
    table: dict[str, Candidate] = {}
    for data in common.lead_dicts(cfg, max(200, n * 20), seed=seed):
        plan = rt.campaigns[data["lp_campaign_id"]]
        supplier = rt.suppliers[data["lp_supplier_id"]]
        if plan.tenant != tenant or supplier.test_mode or (
                campaign is not None and plan.id != campaign):
            continue
        windows, local = clock.get(plan.tz, time.time())
        values, errors = plan.schema.validate(data, today=local.date())
        if errors:
            continue
        raw = msgspec.json.encode(data)
        lead, every_buyer = ingest._lua_lead(plan, values, data, new_lead_id(), False,
                                             windows, local, raw, supplier, None)
        if every_buyer is not None:  # routed with its first candidates: decided with all
            lead = every_buyer()
        if campaign is not None and not lead.candidates:
            continue
        # decide.lua's lead JSON with its delivery payload inline (redis-benchmark sends
        # one static ARGV; the engine sends the payload as its own ARGV)
        out.append(msgspec.structs.replace(decode_lead(lead.json),
                                           payload=lead.payload.decode()))
        table.update(_table.decode(b"{" + b",".join(lead.candidates) + b"}"))
        if len(out) == n:
            return tenant, out, table
    raise RuntimeError(f"only {len(out)} valid leads generated")


_table = msgspec.json.Decoder(dict[str, Candidate])


def randomized(lead: LeadCall) -> LeadCall:
    """The lead with ``__rand_int__`` in its id, idempotency key and fingerprints."""
    bd = lead.buyer_dedupe  # buyer-scope dedupe: each candidate's fingerprints
    return msgspec.structs.replace(
        lead, id=f"{lead.id[:8]}{RAND}{RAND}", key=f"p:{RAND}{RAND}",
        dedupe=[f"{fp[:8]}{RAND}{RAND}" for fp in lead.dedupe],
        buyer_dedupe=None if bd is None else [[f"{fp[:8]}{RAND}{RAND}" for fp in fps]
                                              for fps in bd])


def _counts(r: redis.Redis) -> tuple[int, int]:
    """(EVALSHA calls, failed calls) from INFO commandstats."""
    stats: Any = r.info("commandstats")
    row = stats.get("cmdstat_evalsha", {})
    return int(row.get("calls", 0)), int(row.get("failed_calls", 0))


def _bench(exe: str, port: int, sha: str, prefix: str, arg: str, n: int, cpu: int | None
           ) -> float:
    cmd = [exe, "-h", "127.0.0.1", "-p", str(port), "-n", str(n), "-c", str(CLIENTS),
           "-P", str(PIPELINE), "-r", "2000000000", "-q", "EVALSHA", sha, "1", prefix, arg]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {proc.stderr[-2000:]}")
    m = re.findall(r"([\d.]+) requests per second", proc.stdout)
    return float(m[-1]) if m else n / elapsed


MINIMAL = common.ROOT / "bench" / "minimal.lua"
COMPARED_CAMPAIGN = "solar"  # two campaign dedupe keys per lead; every lead sells


def _timed(exe: str, cfg: Any, srv: Any, r: redis.Redis, source: str, prefix: str, arg: str,
           duration: float, load_cpu: int | None, sold_stream: str) -> dict[str, Any]:
    """One script on a freshly funded Redis under redis-benchmark for ~``duration`` s:
    calls/s, calls, and the entries its sales added to ``sold_stream``."""
    r.flushall()
    asyncio.run(common._fund(cfg, srv.url))  # back to the funded, empty state
    sha = r.script_load(source)
    # calibrate the number of calls for ~duration seconds, then the real run
    calib = _bench(exe, srv.port, sha, prefix, arg, 400, load_cpu)
    n = max(PIPELINE * CLIENTS, int(calib * duration))
    calls0, failed0 = _counts(r)
    sold0 = r.xlen(sold_stream)
    t0 = time.perf_counter()
    calls_per_s = _bench(exe, srv.port, sha, prefix, arg, n, load_cpu)
    elapsed = time.perf_counter() - t0
    calls1, failed1 = _counts(r)
    calls, failed = calls1 - calls0, failed1 - failed0
    if failed:
        raise RuntimeError(f"{failed} of {calls} EVALSHA calls failed")
    return {"calls_per_s": calls_per_s, "calls": calls, "elapsed_s": elapsed,
            "sold": r.xlen(sold_stream) - sold0}


def _arg(leads: list[LeadCall], table: dict[str, Candidate]) -> str:
    batch = Call(now=now_ms(), wallet=WALLET, table=table,
                 leads=[randomized(lead) for lead in leads])
    return msgspec.json.encode(batch).decode()


def run(*, leads_per_call: int = 16, duration: float = 10.0,
        engine_batch_rate: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """decide.lua's leads/s on the mixed calls (every campaign of the first tenant), then
    decide.lua and bench/minimal.lua on the same calls of solar leads, each on a freshly
    funded Redis, ``duration`` / 2 seconds each (the solar buyers' total cap is 100k)."""
    say = (lambda _m: None) if quiet else common.log
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise FileNotFoundError("redis-benchmark not on PATH (Debian: apt-get install redis-tools)")
    cfg = common.load_config()
    _, load_cpu = common.pinning()
    tenant, leads, table = representative_leads(cfg, leads_per_call)
    arg = _arg(leads, table)
    _, solar, solar_table = representative_leads(cfg, leads_per_call, campaign=COMPARED_CAMPAIGN)
    solar_arg = _arg(solar, solar_table)
    prefix = keys.tenant_prefix(tenant)
    source, minimal = scripts().decide.source, MINIMAL.read_text()
    deliveries, sales = keys.deliveries(tenant), prefix + "sales"
    with common.funded_redis(cfg) as srv:
        r = redis.Redis(host="127.0.0.1", port=srv.port)
        try:
            sha = r.script_load(source)
            assert sha == scripts().decide.sha
            # one call by hand first: the batch must decode and decide without an error
            reply = decode_reply(r.evalsha(sha, 1, prefix, arg.replace(RAND, "0" * 12)))
            statuses = [d.status for d in reply.decisions] if isinstance(
                reply.decisions, list) else []
            say(f"lua: {leads_per_call} leads per call, first decision {statuses}")
            say(f"lua: decide.lua, redis-benchmark -P {PIPELINE} -c {CLIENTS}, mixed calls")
            mixed = _timed(exe, cfg, srv, r, source, prefix, arg, duration, load_cpu,
                           deliveries)
            say(f"lua: decide.lua and bench/minimal.lua on {COMPARED_CAMPAIGN} calls")
            same = _timed(exe, cfg, srv, r, source, prefix, solar_arg, duration / 2,
                          load_cpu, deliveries)
            floor = _timed(exe, cfg, srv, r, minimal, prefix, solar_arg, duration / 2,
                           load_cpu, sales)
        finally:
            r.close()
    calls = mixed["calls"]
    leads_per_s = mixed["calls_per_s"] * leads_per_call

    def sold_per_s(t: dict[str, Any]) -> float:
        return t["calls_per_s"] * leads_per_call * t["sold"] / max(1, t["calls"] * leads_per_call)

    decide_sold, minimal_sold = sold_per_s(same), sold_per_s(floor)
    result: dict[str, Any] = {
        "benchmark": "lua",
        "leads_per_s": round(leads_per_s, 1),
        "calls_per_s": round(mixed["calls_per_s"], 1),
        "leads_per_call": leads_per_call,
        "calls": calls,
        "elapsed_s": round(mixed["elapsed_s"], 2),
        "deliveries_per_lead": round(mixed["sold"] / (calls * leads_per_call), 3)
        if calls else 0.0,
        "pipeline": PIPELINE,
        "clients": CLIENTS,
        "engine_batch_leads_per_s": engine_batch_rate,
        "ratio": round(engine_batch_rate / leads_per_s, 3) if engine_batch_rate else None,
        # like for like: the same calls of solar leads, every one sold
        "compared_campaign": COMPARED_CAMPAIGN,
        "decide_sold_leads_per_s": round(decide_sold, 1),
        "minimal_sold_leads_per_s": round(minimal_sold, 1),
        "minimal_over_decide_rate": round(minimal_sold / decide_sold, 3) if decide_sold else None,
        "note": NOTE,
        "machine": common.machine(),
    }
    return result


def report(r: dict[str, Any]) -> None:
    print(f"decide.lua: {r['leads_per_s']:>10,.0f} leads/s  ({r['calls_per_s']:,.0f} calls/s x "
          f"{r['leads_per_call']} leads, -P {r['pipeline']} -c {r['clients']}, "
          f"{r['deliveries_per_lead']:.2f} deliveries per lead)")
    if r.get("minimal_over_decide_rate") is not None:
        print(f"{r['compared_campaign']} calls, sold leads/s: decide.lua "
              f"{r['decide_sold_leads_per_s']:,.0f}, bench/minimal.lua "
              f"{r['minimal_sold_leads_per_s']:,.0f} ({r['minimal_over_decide_rate']:.2f}x)")
    if r["ratio"] is not None:
        print(f"engine batch endpoint: {r['engine_batch_leads_per_s']:,.0f} leads/s = "
              f"{r['ratio']:.2f} of this ceiling")
    print(f"note: this ceiling {r['note']}")
    print(msgspec.json.encode(r).decode(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench lua", description=__doc__.split("\n")[0])
    p.add_argument("--leads-per-call", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--engine-batch-rate", type=float, default=None,
                   help="the engine's batch-endpoint leads/s, for the ratio")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions per lead under callgrind instead (valgrind)")
    p.add_argument("--calls", type=int, default=150, help="calls counted with --instructions")
    args = p.parse_args(argv)
    if args.instructions:
        from bench import lua_instructions

        result = lua_instructions.run(args.calls)
        if result is not None:
            print(msgspec.json.encode(result).decode(), flush=True)
        return 0 if result is not None else 2
    report(run(leads_per_call=args.leads_per_call, duration=args.duration,
               engine_batch_rate=args.engine_batch_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
