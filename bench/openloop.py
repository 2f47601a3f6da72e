"""The engine as users run it: closed-loop max, open-loop latency ladder, and the peer.

``python -m bench ingest --open-loop [--duration 10] [--concurrency 64]``

1. ``leadflow run`` exactly as a user starts it (with its in-process workers: delivery,
   ledger archive, recharge, notify, tenant webhooks; bench.engine_proc ``as_users_run``) on
   an embedded redis-server (AOF everysec), funded like every run;
2. *closed loop*: ``POST /v1/leads``, 64 keep-alive connections, ``duration`` seconds: the
   max single posts/s;
3. *open loop* (bench.loadgen ``rate``: requests on a schedule whatever the replies,
   latency from when each was due: coordinated omission corrected) at a ladder of
   fractions of that max, ``duration`` seconds each, each step started once the workers
   have caught up (bench.redis_memory.wait_drained): p50, p99, p99.9. ``open_loop_p99_ms``
   is the p99 at 50 % (target <= 10 ms);
4. *the peer* (bench.peer: FastAPI + pydantic + redis-py, one EVALSHA debit) on its own
   redis-server, the same load generator, bodies, concurrency and pinning:
   ``peer_ratio`` = leadflow's closed-loop single posts/s over the peer's (target >= 4).

Every phase posts its own fresh leads (no replays). Prints the figures, then LAST one JSON
line.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from typing import Any

import msgspec
import redis

from bench import common, loadgen, nullapp
from bench.engine_proc import rss_bytes, serve_engine
from bench.redis_memory import wait_drained
from engine.store.embedded import EmbeddedRedis

LADDER = (0.25, 0.5, 0.75, 0.9)
TARGET_FRACTION = 0.5
TARGET_P99_MS = 10.0
TARGET_PEER_RATIO = 4.0
SEED, START = 66, 50_000_000  # emails numbered apart from the other benchmarks' leads


def ladder_row(fraction: float, rate: float, r: loadgen.LoadResult) -> dict[str, Any]:
    return {"fraction": fraction, "rate_per_s": round(rate, 1),
            "achieved_per_s": round(r.rps, 1), "p50_ms": round(r.p50_ms, 3),
            "p99_ms": round(r.p99_ms, 3), "p999_ms": round(r.p999_ms, 3),
            "max_ms": round(r.max_ms, 3), "requests": r.requests, "errors": r.errors}


def at_target(ladder: Sequence[dict[str, Any]], fraction: float = TARGET_FRACTION
              ) -> dict[str, Any] | None:
    """The ladder's step at ``fraction`` of the closed-loop max (None if it has none)."""
    return next((s for s in ladder if abs(s["fraction"] - fraction) < 1e-9), None)


def figures(closed_per_s: float, peer_per_s: float, ladder: Sequence[dict[str, Any]]
            ) -> dict[str, Any]:
    """The target keys from the measurements: ``open_loop_p99_ms`` (the p99 at 50 % of the
    closed-loop max) and ``peer_ratio`` (leadflow's closed-loop rate over the peer's)."""
    step = at_target(ladder)
    return {"open_loop_p99_ms": step["p99_ms"] if step else None,
            "peer_ratio": round(closed_per_s / peer_per_s, 3) if peer_per_s else None}


def run(*, duration: float = 10.0, concurrency: int = 64, ladder: Sequence[float] = LADDER,
        warmup: int = 2_000, peer: bool = True, quiet: bool = False) -> dict[str, Any]:
    say = (lambda _m: None) if quiet else common.log
    cfg = common.load_config()
    server_cpu, load_cpu = common.pinning()
    start = START

    def bodies(n: int) -> list[bytes]:
        nonlocal start
        out = common.single_bodies(cfg, max(1, n), seed=SEED + start, start=start)
        start += n
        return out

    def closed(url: str, pool: list[bytes]) -> loadgen.LoadResult:
        return loadgen.run(url + "/v1/leads", method="POST", bodies=pool,
                           headers=common.JSON_HEADERS, concurrency=concurrency,
                           duration=duration, cpu=load_cpu)

    guess = max(2_000, int(duration * 12_000))  # more than any closed-loop run here posts
    say(f"open loop: generating {guess:,} leads for the closed-loop runs")
    pool, peer_pool, warm = bodies(guess), bodies(guess), bodies(warmup)
    steps: list[dict[str, Any]] = []
    with common.funded_redis(cfg) as srv, serve_engine(common.EXAMPLE_CONFIG, srv.url,
                                                       cpu=server_cpu, as_users_run=True) as url:
        say("open loop: `leadflow run` (with its workers), closed loop")
        loadgen.run(url + "/v1/leads", method="POST", bodies=warm, headers=common.JSON_HEADERS,
                    concurrency=concurrency, requests=warmup, cpu=load_cpu)
        top = closed(url, pool)
        say(f"open loop: closed-loop max {top.rps:,.0f} leads/s, p99 {top.p99_ms:.1f} ms")
        r = redis.Redis(host="127.0.0.1", port=srv.port)
        tenants = [t.id for t in cfg.tenants]
        for fraction in ladder:
            # each step starts with the workers caught up (deliveries made, ledger
            # archived): the closed loop and the step before leave them a backlog
            waited = wait_drained(r, tenants)
            rate = top.rps * fraction
            res = loadgen.run(url + "/v1/leads", method="POST",
                              bodies=bodies(int(rate * duration) + 1),
                              headers=common.JSON_HEADERS, concurrency=concurrency,
                              duration=duration, cpu=load_cpu, rate=rate)
            steps.append({**ladder_row(fraction, rate, res), "drain_wait_s": round(waited, 1)})
            say(f"open loop: {fraction:.0%} = {rate:,.0f}/s: p50 {res.p50_ms:.1f} ms, "
                f"p99 {res.p99_ms:.1f} ms, p99.9 {res.p999_ms:.1f} ms")
        rss = rss_bytes(url.pid)
        r.close()
    peer_res = None
    if peer:
        with tempfile.TemporaryDirectory(prefix="leadflow-bench-peer-") as tmp, \
                EmbeddedRedis(tmp, appendfsync="everysec") as psrv, \
                nullapp.serve("bench.peer:app", cpu=server_cpu,
                              env={"PEER_REDIS_URL": psrv.url}) as purl:
            say("open loop: the peer (FastAPI + pydantic + redis-py), closed loop")
            loadgen.run(purl + "/v1/leads", method="POST", bodies=warm,
                        headers=common.JSON_HEADERS, concurrency=concurrency,
                        requests=warmup, cpu=load_cpu)
            peer_res = closed(purl, peer_pool)
            say(f"open loop: peer {peer_res.rps:,.0f} req/s, p99 {peer_res.p99_ms:.1f} ms")
    out: dict[str, Any] = {
        "benchmark": "openloop",
        "engine": "leadflow run (in-process workers)",
        "closed_loop_per_s": round(top.rps, 1),
        "closed_loop_p50_ms": round(top.p50_ms, 3),
        "closed_loop_p99_ms": round(top.p99_ms, 3),
        "closed_loop_status_counts": {str(k): v for k, v in top.status_counts.items()},
        "ladder": steps,
        "peer_per_s": round(peer_res.rps, 1) if peer_res else None,
        "peer_p99_ms": round(peer_res.p99_ms, 3) if peer_res else None,
        "peer_status_counts": {str(k): v for k, v in peer_res.status_counts.items()}
        if peer_res else None,
        **figures(top.rps, peer_res.rps if peer_res else 0.0, steps),
        # more requests than distinct bodies: some were replays (raise the pool's size)
        "bodies_reused": top.requests > len(pool) or bool(
            peer_res and peer_res.requests > len(peer_pool)),
        "engine_rss_bytes": rss,
        "duration_s": duration,
        "concurrency": concurrency,
        "targets": {"open_loop_p99_ms": TARGET_P99_MS, "peer_ratio": TARGET_PEER_RATIO},
        "machine": common.machine(),
    }
    with contextlib.suppress(KeyError):
        out["errors"] = top.errors + sum(s["errors"] for s in steps)
    return out


def report(r: dict[str, Any]) -> None:
    print(f"leadflow run, closed loop: {r['closed_loop_per_s']:>9,.0f} leads/s  "
          f"p99 {r['closed_loop_p99_ms']:.1f} ms")
    for s in r["ladder"]:
        print(f"open loop {s['fraction']:>4.0%} ({s['rate_per_s']:>7,.0f}/s): "
              f"p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  p99.9 {s['p999_ms']:.2f} ms")
    if r["open_loop_p99_ms"] is not None:
        ok = r["open_loop_p99_ms"] <= TARGET_P99_MS
        print(f"open_loop_p99_ms: {r['open_loop_p99_ms']:.2f} (target <= {TARGET_P99_MS}: "
              f"{'met' if ok else 'NOT met'})")
    if r["peer_ratio"] is not None:
        ok = r["peer_ratio"] >= TARGET_PEER_RATIO
        print(f"peer (FastAPI + pydantic + redis-py): {r['peer_per_s']:,.0f} req/s; "
              f"peer_ratio {r['peer_ratio']:.2f} (target >= {TARGET_PEER_RATIO}: "
              f"{'met' if ok else 'NOT met'})")
    print(f"machine: {common.machine_line(r['machine'])}")
    print(msgspec.json.encode(r).decode(), flush=True)
