"""Redis memory per sold lead once the workers have caught up (issue #16, ``redis_bytes_per_lead``).

``python -m bench memory --redis [--leads 20000]``

``leadflow run`` as users run it (bench.engine_proc ``as_users_run``: its in-process
delivery, ledger archive, notify and webhook workers) on an embedded redis-server (AOF
everysec), funded like every run; ``--leads`` fresh single posts of the ingest
benchmark's generator (mixed campaigns; ~8 % invalid, ~7 % duplicates, ~3 % test) through
``POST /v1/leads``; then the run waits until every consumer group of every stream has read
and acknowledged everything (:func:`wait_drained`: deliveries made, ledger archived to SQL
and trimmed, events told). Then ``SCAN`` + ``MEMORY USAGE`` (``SAMPLES 0``: exact) of
every key, grouped by kind (:func:`kind`), before and after, divided by the sold leads
(ACCEPTED answers, not test): bytes per sold lead by kind.

The steady state for 1M sold leads a day: a kind whose keys live ``ttl`` days holds
``ttl`` days of leads (idempotency 1 day, dedupe marks the campaign's look-back: 30 days
for solar, the sale record and the delivery state 14 days, the delivery log until its
delivery settles); a stream
trimmed by its consumers holds what is in flight (the measured bytes, ~0 once drained);
the events stream (a few entries per thousand leads) keeps at most its last 1M entries
(``MAXLEN ~ 1000000``): counted like the drained streams, as a day's worth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import redis

from bench import common, loadgen
from bench.engine_proc import serve_engine

SEED, START = 88, 60_000_000
CONCURRENCY = 64
LEADS_PER_DAY = 1_000_000
# kind -> days its keys live (None: a stream, measured as it stands; see module docs)
RETENTION_DAYS: dict[str, float | None] = {
    "idempotency": 1.0,  # settings.idempotency_ttl_s (86400)
    "dedupe": 30.0,  # the solar campaign's dedupe.days (30; auto-insurance 7)
    "sale record": 14.0,  # decide.lua's LEAD_TTL
    # the log: deleted when its delivery settles (delivery_finish.lua), ~0 once drained;
    # the state (the decision) stays engine.delivery.record.STATE_TTL_S
    "delivery log": 14.0,
    "delivery state": 14.0,
    "ledger stream": None,  # archived to SQL and trimmed by the ledger worker
    "deliveries stream": None,  # XACK + XDEL once delivered
    "sold stream": None,  # XACK + XDEL once in the lead archive (billing.leads)
    "events stream": None,  # MAXLEN ~ 1M entries, whatever the age
    "other": None,  # accounts, buyers, cursors, scripts' fixed keys: not per lead
}
TARGET_BYTES = 500


def kind(key: str) -> str:
    """The kind of a leadflow key (engine.core.keys), for the breakdown."""
    rest = key.split("}:", 1)[-1]
    head = rest.split(":", 1)[0]
    return {"idem": "idempotency", "dup": "dedupe", "lead": "sale record",
            "dlog": "delivery log", "dstate": "delivery state"}.get(head) or {
        "ledger": "ledger stream", "deliveries": "deliveries stream", "sold": "sold stream",
        "events": "events stream"}.get(rest, "other")


def usage_by_kind(r: redis.Redis) -> dict[str, dict[str, int]]:
    """kind -> {keys, bytes} over the whole keyspace (MEMORY USAGE ... SAMPLES 0)."""
    out: dict[str, dict[str, int]] = {}
    names = [k.decode() for k in r.scan_iter(count=1000)]
    for i in range(0, len(names), 500):
        pipe = r.pipeline(transaction=False)
        for name in names[i:i + 500]:
            pipe.memory_usage(name, samples=0)
        for name, size in zip(names[i:i + 500], pipe.execute(), strict=True):
            row = out.setdefault(kind(name), {"keys": 0, "bytes": 0})
            row["keys"] += 1
            row["bytes"] += int(size or 0)
    return out


def per_lead(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]],
             sold: int) -> dict[str, float]:
    """Bytes per sold lead of each kind: its growth over the run over ``sold``."""
    kinds = set(before) | set(after)
    return {k: round((after.get(k, {}).get("bytes", 0) - before.get(k, {}).get("bytes", 0))
                     / sold, 1) for k in sorted(kinds)} if sold else {}


def steady_state(per_kind: Mapping[str, float], *, leads_per_day: int = LEADS_PER_DAY,
                 retention: Mapping[str, float | None] = RETENTION_DAYS) -> dict[str, float]:
    """Bytes held for ``leads_per_day`` sold leads a day at the retentions: a kind that
    lives ``d`` days holds ``d`` days of leads; a stream (drained by its consumers, or the
    events stream, rare per lead and bounded at 1M entries) what the run left in it per
    lead, as if a day's worth."""
    out: dict[str, float] = {}
    for k, b in per_kind.items():
        if k == "other":
            continue  # not per lead: accounts, buyers, cursors
        days = retention.get(k)
        out[k] = b * leads_per_day * (days if days is not None else 1.0)
    out["total"] = sum(out.values())
    return out


def _stream_state(r: redis.Redis, streams: Iterable[str]) -> list[tuple[str, str, int, int]]:
    """(stream, group, pending, lag) of every consumer group of ``streams``. A lag Redis
    cannot tell (nil: entries deleted past the group's position) is 0 when the group has
    been delivered the stream's last entry, else -1."""
    rows = []
    for s in streams:
        if not r.exists(s):
            continue
        groups: Any = r.xinfo_groups(s)
        last: Any = None
        for g in groups:
            lag = g.get("lag")
            if lag is None:
                if last is None:
                    info: Any = r.xinfo_stream(s)
                    last = info["last-generated-id"]
                lag = 0 if g["last-delivered-id"] == last else -1
            rows.append((s, str(g["name"]), int(g["pending"]), int(lag)))
    return rows


def wait_drained(r: redis.Redis, tenants: Iterable[str], *, timeout: float = 300.0,
                 settle: float = 1.0) -> float:
    """Wait until every consumer group of the tenants' ledger, deliveries, events and sold
    streams has nothing pending and no lag (read and acknowledged everything); seconds
    waited. TimeoutError after ``timeout``."""
    from engine.core import keys

    streams = [f(t) for t in tenants
               for f in (keys.ledger, keys.deliveries, keys.events, keys.sold)]
    t0 = time.monotonic()
    while True:
        rows = _stream_state(r, streams)
        if all(p == 0 and lag == 0 for _, _, p, lag in rows):
            time.sleep(settle)  # a last archive trim, a retry due: then check once more
            rows = _stream_state(r, streams)
            if all(p == 0 and lag == 0 for _, _, p, lag in rows):
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"streams not drained after {timeout:.0f} s: {rows}")
        time.sleep(0.5)


def run(*, leads: int = 20_000, quiet: bool = False) -> dict[str, Any]:
    say = (lambda _m: None) if quiet else common.log
    cfg = common.load_config()
    server_cpu, load_cpu = common.pinning()
    tenants = [t.id for t in cfg.tenants]
    bodies = common.single_bodies(cfg, leads, seed=SEED, start=START)
    with common.funded_redis(cfg) as srv, serve_engine(common.EXAMPLE_CONFIG, srv.url,
                                                       cpu=server_cpu, as_users_run=True) as url:
        r = redis.Redis(host="127.0.0.1", port=srv.port)
        try:
            wait_drained(r, tenants)
            before = usage_by_kind(r)
            used0 = int(r.info("memory")["used_memory"])  # type: ignore[index]
            loadgen.run(url + "/v1/leads", method="POST", bodies=bodies,
                        headers=common.JSON_HEADERS, concurrency=CONCURRENCY,
                        requests=len(bodies), cpu=load_cpu)
            say(f"redis memory: {leads:,} leads posted; waiting for the workers")
            waited = wait_drained(r, tenants)
            after = usage_by_kind(r)
            # a sold (not test) lead has exactly one sale record (lead:<id>, 14 days)
            sold = _keys(after, "sale record") - _keys(before, "sale record")
            used1 = int(r.info("memory")["used_memory"])  # type: ignore[index]
        finally:
            r.close()
    kinds = per_lead(before, after, sold)
    total = round(sum(v for k, v in kinds.items() if k != "other"), 1)
    steady = steady_state(kinds)
    return {
        "benchmark": "redis_memory",
        "engine": "leadflow run (in-process workers)",
        "leads": leads,
        "sold": sold,
        "drain_wait_s": round(waited, 1),
        "redis_bytes_per_lead": total,
        "bytes_per_sold_lead_by_kind": kinds,
        "keys_by_kind": {k: v["keys"] for k, v in after.items()},
        "used_memory_per_sold_lead": round((used1 - used0) / sold, 1) if sold else None,
        "steady_state_bytes_1m_per_day": {k: round(v) for k, v in steady.items()},
        "steady_state_gb_1m_per_day": round(steady["total"] / 1e9, 2),
        "retention_days": RETENTION_DAYS,
        "target_bytes": TARGET_BYTES,
        "machine": common.machine(),
    }


def _keys(usage: Mapping[str, Mapping[str, int]], k: str) -> int:
    return usage.get(k, {}).get("keys", 0)


def report(r: dict[str, Any]) -> None:
    print(f"Redis bytes per sold lead, `leadflow run` caught up ({r['sold']:,} sold of "
          f"{r['leads']:,} posted):")
    steady = r["steady_state_bytes_1m_per_day"]
    print(f"  {'kind':<18} {'bytes/lead':>10} {'retention':>10} {'1M/day steady':>14}")
    for k, b in r["bytes_per_sold_lead_by_kind"].items():
        days = r["retention_days"].get(k)
        held = steady.get(k)
        print(f"  {k:<18} {b:>10,.0f} {(f'{days:g} d' if days else '-'):>10} "
              f"{(f'{held / 1e9:,.2f} GB' if held is not None else '-'):>14}")
    ok = r["redis_bytes_per_lead"] <= r["target_bytes"]
    print(f"redis_bytes_per_lead: {r['redis_bytes_per_lead']:,.0f} (target <= "
          f"{r['target_bytes']}: {'met' if ok else 'NOT met'}); 1M sold leads a day: "
          f"{r['steady_state_gb_1m_per_day']:.1f} GB in steady state")
    print(msgspec.json.encode(r).decode(), flush=True)
