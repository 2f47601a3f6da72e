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


def representative_leads(cfg: Any, n: int, *, seed: int = SEED
                         ) -> tuple[str, list[LeadCall], dict[str, Candidate]]:
    """(tenant, ``n`` Lua leads, the candidate table their candidates' keys refer to) of
    valid generated leads of the first tenant, built by the engine's own code path (schema
    validation, routing plan, ``Ingest._lua_lead``)."""
    rt = Runtime(cfg)
    ingest = Ingest(lambda: rt, lambda _t: None)  # type: ignore[arg-type,return-value]
    clock = ingest._clock
    tenant = cfg.tenants[0].id
    out: list[LeadCall] = []
    table: dict[str, Candidate] = {}
    for data in common.lead_dicts(cfg, max(200, n * 20), seed=seed):
        plan = rt.campaigns[data["lp_campaign_id"]]
        supplier = rt.suppliers[data["lp_supplier_id"]]
        if plan.tenant != tenant or supplier.test_mode:
            continue
        windows, local = clock.get(plan.tz, time.time())
        values, errors = plan.schema.validate(data, today=local.date())
        if errors:
            continue
        raw = msgspec.json.encode(data)
        lead = ingest._lua_lead(plan, values, data, new_lead_id(), False, windows,
                                local, raw, supplier, None)
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


def run(*, leads_per_call: int = 16, duration: float = 10.0,
        engine_batch_rate: float | None = None, quiet: bool = False) -> dict[str, Any]:
    say = (lambda _m: None) if quiet else common.log
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise FileNotFoundError("redis-benchmark not on PATH (Debian: apt-get install redis-tools)")
    cfg = common.load_config()
    _, load_cpu = common.pinning()
    tenant, leads, table = representative_leads(cfg, leads_per_call)
    batch = Call(now=now_ms(), wallet=WALLET, table=table,
                 leads=[randomized(lead) for lead in leads])
    arg = msgspec.json.encode(batch).decode()
    prefix = keys.tenant_prefix(tenant)
    with common.funded_redis(cfg) as srv:
        r = redis.Redis(host="127.0.0.1", port=srv.port)
        try:
            source = scripts().decide.source
            sha = r.script_load(source)
            assert sha == scripts().decide.sha
            # one call by hand first: the batch must decode and decide without an error
            reply = decode_reply(r.evalsha(sha, 1, prefix, arg.replace(RAND, "0" * 12)))
            statuses = [d.status for d in reply.decisions] if isinstance(
                reply.decisions, list) else []
            say(f"lua: {leads_per_call} leads per call, first decision {statuses}")
            r.flushall()
            asyncio.run(common._fund(cfg, srv.url))  # back to the funded, empty state
            r.script_load(source)
            # calibrate the number of calls for ~duration seconds, then the real run
            calib = _bench(exe, srv.port, sha, prefix, arg, 400, load_cpu)
            n = max(PIPELINE * CLIENTS, int(calib * duration))
            say(f"lua: redis-benchmark -P {PIPELINE} -c {CLIENTS}, {n:,} calls")
            calls0, failed0 = _counts(r)
            sold0 = r.xlen(keys.deliveries(tenant))
            t0 = time.perf_counter()
            calls_per_s = _bench(exe, srv.port, sha, prefix, arg, n, load_cpu)
            elapsed = time.perf_counter() - t0
            calls1, failed1 = _counts(r)
            sold = r.xlen(keys.deliveries(tenant)) - sold0
        finally:
            r.close()
    calls, failed = calls1 - calls0, failed1 - failed0
    if failed:
        raise RuntimeError(f"{failed} of {calls} EVALSHA calls failed")
    leads_per_s = calls_per_s * leads_per_call
    result: dict[str, Any] = {
        "benchmark": "lua",
        "leads_per_s": round(leads_per_s, 1),
        "calls_per_s": round(calls_per_s, 1),
        "leads_per_call": leads_per_call,
        "calls": calls,
        "elapsed_s": round(elapsed, 2),
        "deliveries_per_lead": round(sold / (calls * leads_per_call), 3) if calls else 0.0,
        "pipeline": PIPELINE,
        "clients": CLIENTS,
        "engine_batch_leads_per_s": engine_batch_rate,
        "ratio": round(engine_batch_rate / leads_per_s, 3) if engine_batch_rate else None,
        "note": NOTE,
        "machine": common.machine(),
    }
    return result


def report(r: dict[str, Any]) -> None:
    print(f"decide.lua: {r['leads_per_s']:>10,.0f} leads/s  ({r['calls_per_s']:,.0f} calls/s x "
          f"{r['leads_per_call']} leads, -P {r['pipeline']} -c {r['clients']}, "
          f"{r['deliveries_per_lead']:.2f} deliveries per lead)")
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
