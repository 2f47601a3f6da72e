"""Engine memory under sustained ingest: RSS after 100k leads vs after 1M.

``python -m bench memory [--leads 1000000]``

The engine (config/example.toml, its own process, no workers) on an embedded redis-server
(AOF everysec); realistic leads (engine.run.demo's generator, fresh people in every chunk) are
posted through ``POST /v1/leads/batch`` (100 per request, 8 connections) in chunks of 100k.
The engine's RSS is read from /proc after each chunk. Flat = the last reading within 10 % of
the one after the first 100k. Redis's own memory and AOF size per lead are reported too
(they grow by design: ledger streams, deliveries, dedupe keys).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis

from bench import common, loadgen
from bench.engine_proc import rss_bytes, serve_engine

FIRST = 100_000
CHUNK = 100_000
BATCH = 100
CONCURRENCY = 8
TARGET_GROWTH = 1.10
SEED = 55
START = 30_000_000  # emails numbered apart from the other benchmarks' leads


def _mib(n: int) -> float:
    return n / 2**20


def run(*, leads: int = 1_000_000, first: int = FIRST, chunk: int = CHUNK, quiet: bool = False
        ) -> dict[str, Any]:
    say = (lambda _m: None) if quiet else common.log
    if leads < first:
        raise ValueError(f"--leads must be at least {first}")
    cfg = common.load_config()
    server_cpu, load_cpu = common.pinning()
    readings: list[tuple[int, int]] = []  # (leads posted, engine RSS bytes)
    statuses: dict[str, int] = {}
    with common.funded_redis(cfg) as srv, serve_engine(common.EXAMPLE_CONFIG, srv.url,
                                                       cpu=server_cpu) as url:
        start_rss = rss_bytes(url.pid)
        posted = 0
        while posted < leads:
            n = min(first if posted == 0 else chunk, leads - posted)
            n -= n % BATCH
            if n <= 0:
                break
            bodies = common.batch_bodies(cfg, n // BATCH, BATCH, seed=SEED + posted,
                                         start=START + posted)
            res = loadgen.run(url + "/v1/leads/batch", method="POST", bodies=bodies,
                              headers=common.NDJSON_HEADERS, concurrency=CONCURRENCY,
                              requests=len(bodies), cpu=load_cpu)
            for code, count in res.status_counts.items():
                statuses[str(code)] = statuses.get(str(code), 0) + count
            posted += n
            readings.append((posted, rss_bytes(url.pid)))
            say(f"memory: {posted:>9,} leads, engine RSS {_mib(readings[-1][1]):7.1f} MiB "
                f"({res.rps * BATCH:,.0f} leads/s)")
        r = redis.Redis(host="127.0.0.1", port=srv.port)
        try:
            info: Any = r.info("memory")
            redis_used = int(info["used_memory"])
        finally:
            r.close()
        aof = sum(f.stat().st_size for f in Path(srv.state_dir).rglob("*.aof*") if f.is_file())
    rss_first = readings[0][1]
    rss_last = readings[-1][1]
    growth = rss_last / rss_first
    return {
        "benchmark": "memory",
        "leads": readings[-1][0],
        "first_leads": readings[0][0],
        "rss_start_bytes": start_rss,
        "rss_first_bytes": rss_first,
        "rss_last_bytes": rss_last,
        "growth": round(growth, 3),
        "flat": growth <= TARGET_GROWTH,
        "readings": [{"leads": n, "rss_bytes": b} for n, b in readings],
        "http_status_counts": statuses,
        "redis_used_memory_bytes": redis_used,
        "redis_bytes_per_lead": round(redis_used / readings[-1][0]),
        "aof_bytes_per_lead": round(aof / readings[-1][0]),
        "machine": common.machine(),
    }


def report(r: dict[str, Any]) -> None:
    print(f"engine RSS after {r['first_leads']:>9,} leads: {_mib(r['rss_first_bytes']):8.1f} MiB")
    print(f"engine RSS after {r['leads']:>9,} leads: {_mib(r['rss_last_bytes']):8.1f} MiB")
    print(f"ratio: {r['growth']:.3f}  (flat = within {TARGET_GROWTH - 1:.0%}: "
          f"{'met' if r['flat'] else 'NOT met'})")
    print(f"redis: {r['redis_bytes_per_lead']:,} bytes of memory and {r['aof_bytes_per_lead']:,} "
          f"bytes of AOF per lead (by design: ledgers, deliveries, dedupe keys)")
    print(msgspec.json.encode(r).decode(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n")[0])
    p.add_argument("--leads", type=int, default=None,
                   help="1,000,000 (engine RSS), or 20,000 with --redis")
    p.add_argument("--redis", action="store_true",
                   help="Redis memory per sold lead by kind of key, once `leadflow run`'s "
                        "workers have caught up (bench.redis_memory)")
    args = p.parse_args(argv)
    if args.redis:
        from bench import redis_memory

        redis_memory.report(redis_memory.run(leads=args.leads or 20_000))
        return 0
    args.leads = args.leads or 1_000_000
    report(run(leads=args.leads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
