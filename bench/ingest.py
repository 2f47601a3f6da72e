"""Ingest throughput: ``POST /v1/leads`` against the null-endpoint ceiling, and the batch endpoint.

``python -m bench ingest [--duration 10] [--concurrency 64]``

1. *ceiling*: the null ASGI app (bench.nullapp) on the same uvicorn/httptools/uvloop stack,
   driven with the same lead bodies, the same concurrency and duration;
2. *single*: the engine (config/example.toml, its own process, no workers) on an embedded
   redis-server with AOF ``everysec``, ``POST /v1/leads``, 64 keep-alive connections, many
   distinct pre-generated leads (engine.run.demo's generator: mostly valid, ~8 % invalid, ~7 %
   duplicates, ~3 % test leads; unique emails, so the 60 s replay window never turns them
   into replays);
3. *batch*: ``POST /v1/leads/batch`` with NDJSON bodies of 100 leads, 8 connections.

Pinning (when taskset exists): server on CPU 0, load generator on CPU 1, redis floats.
Accounts are topped up first (bench.common.TOP_UP_MICROS) so leads keep selling.
Prints the figures, then LAST one JSON line. Targets (reported, not asserted): ratio >= 0.5
with p99 <= 10 ms; batch >= 3x single.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from bench import common, loadgen, nullapp
from bench.engine_proc import rss_bytes, serve_engine

TARGET_RATIO = 0.5
TARGET_P99_MS = 10.0
TARGET_BATCH_RATIO = 3.0
SINGLE_SEED, BATCH_SEED, WARM_SEED = 11, 22, 33
# emails are numbered from these offsets so no two phases post the same person
SINGLE_START, BATCH_START, WARM_START = 0, 10_000_000, 20_000_000


def _result_dict(r: loadgen.LoadResult) -> dict[str, Any]:
    return msgspec.to_builtins(r)  # type: ignore[no-any-return]


def run(
    *,
    duration: float = 10.0,
    concurrency: int = 64,
    batch_concurrency: int = 8,
    batch_size: int = 100,
    single_leads: int | None = None,
    batches: int | None = None,
    warmup: int = 2_000,
    config: str = str(common.EXAMPLE_CONFIG),
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the ingest benchmark; returns the result dict (the JSON line's content)."""
    say = (lambda _m: None) if quiet else common.log
    cfg = common.load_config(config)
    server_cpu, load_cpu = common.pinning()
    # enough distinct bodies that a 10 s run never posts the same one twice (replay)
    single_leads = single_leads or max(2_000, int(duration * 12_000))
    batches = batches or max(10, int(duration * 300))
    say(f"ingest: generating {single_leads:,} single and {batches * batch_size:,} batch leads")
    single = common.single_bodies(cfg, single_leads, seed=SINGLE_SEED, start=SINGLE_START)
    batch = common.batch_bodies(cfg, batches, batch_size, seed=BATCH_SEED, start=BATCH_START)
    warm = common.single_bodies(cfg, max(1, warmup), seed=WARM_SEED, start=WARM_START)

    def drive(url: str, bodies: list[bytes], conc: int, headers: dict[str, str]
              ) -> loadgen.LoadResult:
        return loadgen.run(url, method="POST", bodies=bodies, headers=headers,
                           concurrency=conc, duration=duration, cpu=load_cpu)

    say("ingest: ceiling (null app, same stack, same load)")
    with nullapp.serve("bench.nullapp:app", cpu=server_cpu) as url:
        loadgen.run(url + "/v1/leads", method="POST", bodies=warm, headers=common.JSON_HEADERS,
                    concurrency=concurrency, requests=warmup, cpu=load_cpu)
        ceiling = drive(url + "/v1/leads", single, concurrency, common.JSON_HEADERS)
    say(f"ingest: ceiling {ceiling.rps:,.0f} req/s, p99 {ceiling.p99_ms:.2f} ms")

    with common.funded_redis(cfg) as srv, serve_engine(config, srv.url, cpu=server_cpu) as url:
        say("ingest: engine, POST /v1/leads")
        loadgen.run(url + "/v1/leads", method="POST", bodies=warm, headers=common.JSON_HEADERS,
                    concurrency=concurrency, requests=warmup, cpu=load_cpu)
        one = drive(url + "/v1/leads", single, concurrency, common.JSON_HEADERS)
        say(f"ingest: single {one.rps:,.0f} leads/s, p99 {one.p99_ms:.2f} ms")
        say("ingest: engine, POST /v1/leads/batch")
        many = drive(url + "/v1/leads/batch", batch, batch_concurrency, common.NDJSON_HEADERS)
        rss = rss_bytes(url.pid)
    batch_rate = many.rps * batch_size
    result = {
        "benchmark": "ingest",
        "leads_per_s": round(one.rps, 1),
        "ceiling_per_s": round(ceiling.rps, 1),
        "ratio": round(one.rps / ceiling.rps, 3) if ceiling.rps else 0.0,
        "p50_ms": round(one.p50_ms, 3),
        "p99_ms": round(one.p99_ms, 3),
        "ceiling_p50_ms": round(ceiling.p50_ms, 3),
        "ceiling_p99_ms": round(ceiling.p99_ms, 3),
        "batch_leads_per_s": round(batch_rate, 1),
        "batch_ratio": round(batch_rate / one.rps, 3) if one.rps else 0.0,
        "batch_p50_ms": round(many.p50_ms, 3),
        "batch_p99_ms": round(many.p99_ms, 3),
        "status_counts": {str(k): v for k, v in one.status_counts.items()},
        "batch_status_counts": {str(k): v for k, v in many.status_counts.items()},
        "errors": one.errors + many.errors + ceiling.errors,
        "bodies_reused": one.requests > len(single) or many.requests > len(batch),
        "loadgen_cpu": round(one.cpu_util, 2),
        "ceiling_loadgen_cpu": round(ceiling.cpu_util, 2),
        "engine_rss_bytes": rss,
        "duration_s": duration,
        "concurrency": concurrency,
        "batch_concurrency": batch_concurrency,
        "batch_size": batch_size,
        "targets": {"ratio": TARGET_RATIO, "p99_ms": TARGET_P99_MS,
                    "batch_ratio": TARGET_BATCH_RATIO},
        "machine": common.machine(),
    }
    return result


def report(r: dict[str, Any]) -> None:
    met = r["ratio"] >= TARGET_RATIO and r["p99_ms"] <= TARGET_P99_MS
    print(f"single : {r['leads_per_s']:>10,.0f} leads/s  p50 {r['p50_ms']:.2f} ms  "
          f"p99 {r['p99_ms']:.2f} ms  (HTTP status {r['status_counts']})")
    print(f"ceiling: {r['ceiling_per_s']:>10,.0f} req/s    p50 {r['ceiling_p50_ms']:.2f} ms  "
          f"p99 {r['ceiling_p99_ms']:.2f} ms  (null app, same stack and load)")
    print(f"ratio  : {r['ratio']:.2f}  (target >= {TARGET_RATIO} with p99 <= {TARGET_P99_MS} ms:"
          f" {'met' if met else 'NOT met'})")
    print(f"batch  : {r['batch_leads_per_s']:>10,.0f} leads/s  ({r['batch_size']} per request, "
          f"{r['batch_concurrency']} connections, p99 {r['batch_p99_ms']:.1f} ms per request)")
    print(f"batch/single: {r['batch_ratio']:.2f}  (target >= {TARGET_BATCH_RATIO}: "
          f"{'met' if r['batch_ratio'] >= TARGET_BATCH_RATIO else 'NOT met'})")
    if r["bodies_reused"]:
        print("note: more requests than distinct bodies; some were replays")
    print(f"machine: {common.machine_line(r['machine'])}")
    print(msgspec.json.encode(r).decode(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch-concurrency", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--instructions", action="store_true",
                   help="count the engine's instructions per lead under callgrind instead "
                        "(valgrind; in-process, no HTTP server)")
    p.add_argument("--requests", type=int, default=2_000,
                   help="single posts counted with --instructions")
    p.add_argument("--batches", type=int, default=20,
                   help="batches of 100 counted with --instructions")
    p.add_argument("--buyers-growth", action="store_true",
                   help="with --instructions: also count 1 and 200 eligible buyers")
    p.add_argument("--open-loop", action="store_true",
                   help="`leadflow run` (with its workers): closed-loop max, open-loop p50/p99/"
                        "p99.9 at a ladder of rates, and the FastAPI peer (bench.openloop)")
    args = p.parse_args(argv)
    if args.open_loop:
        from bench import openloop

        openloop.report(openloop.run(duration=args.duration, concurrency=args.concurrency))
        return 0
    if args.instructions:
        from bench import ingest_instructions

        result = ingest_instructions.run(args.requests, args.batches)
        if result is None:
            return 1
        if args.buyers_growth:
            result.update(ingest_instructions.growth() or {})
        print(msgspec.json.encode(result).decode(), flush=True)
        return 0
    report(run(duration=args.duration, concurrency=args.concurrency,
               batch_concurrency=args.batch_concurrency, batch_size=args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
