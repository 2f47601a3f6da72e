"""Counters against what was written: every ledger entry Store writes is counted once in
the money counters (by kind, replays never), every ``delivery_failed`` event the delivery
worker appends is counted in ``leadflow_events_emitted_total``; and ``leadflow worker
--metrics-port`` binds to ``settings.host`` and logs the port it bound.

Real redis-server, real decide.lua sales, real HTTP buyers; no mocks, no sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from engine.core import keys, money
from engine.core.config import Config, ResponseRule
from engine.delivery import record
from engine.delivery.record import read_decision
from engine.delivery.worker import DeliveryWorker, WorkerOptions
from engine.obs import telemetry
from engine.obs.metrics import CREDIT_KINDS, EVENT_TYPES, Metrics, render
from engine.store.store import Store, now_ms
from tests.helpers import ROOT, sales
from tests.helpers.buyers import SECRET, Buyers
from tests.helpers.harness import BASE_TOML

T = sales.T
# decide.lua's debits are counted by the service's batch observer, not through Store
DECIDE_KINDS = {"lead", "fee"}


class Counted:
    """What Store's observers reported: money by (direction, kind), events by type."""

    def __init__(self) -> None:
        self.money: collections.Counter[tuple[str, str]] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()

    def on_money(self, kind: str, delta: int) -> None:
        if delta:
            self.money[("credit" if delta > 0 else "debit", kind)] += abs(delta)

    def on_events(self, events: Any) -> None:
        flat = list(events)
        for etype, n in zip(flat[::2], flat[1::2], strict=True):
            self.events[str(etype)] += int(n)


async def ledger_totals(redis: aioredis.Redis) -> collections.Counter[tuple[str, str]]:
    """Every ledger entry of the tenant, summed by (direction, kind), decide.lua's left out."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for _, f in await redis.xrange(keys.ledger(T)):
        kind, delta = f[b"kind"].decode(), int(f[b"delta"])
        if kind not in DECIDE_KINDS and delta:
            out[("credit" if delta > 0 else "debit", kind)] += abs(delta)
    return out


async def event_totals(redis: aioredis.Redis) -> collections.Counter[str]:
    return collections.Counter(f[b"type"].decode() for _, f in await redis.xrange(keys.events(T)))


def test_new_label_values_are_known_up_front() -> None:
    assert "reprice" in CREDIT_KINDS  # a real-time price below the routed one credits
    assert "delivery_failed" in EVENT_TYPES


async def test_store_counts_every_ledger_entry_it_writes_once(redis) -> None:
    """Openings, refunds (with their fee_refund), returns, reprices up and down: the
    counters equal the ledger, by kind; replays and a second sync add nothing."""
    counted = Counted()
    store = Store(redis, observer=counted.on_money, events_observer=counted.on_events)
    bs = [sales.buyer(f"b{i}", "http://127.0.0.1:9/") for i in range(4)]
    await sales.accounts(store, *bs)
    for i, b in enumerate(bs):
        await sales.sell(store, b, f"L{i}")  # $25.00 each, $0.50 outbound fee
    assert (await store.refund_sale(T, "L0", "b0", "rejected")).ok
    assert (await store.refund_sale(T, "L1", "b1", "return: bad", kind="return")).ok
    assert (await store.reprice_sale(T, "L2", "b2", 30_000_000)).price == "30000000"
    assert (await store.reprice_sale(T, "L3", "b3", 18_500_000)).price == "18500000"
    await store.adjust(T, "c-b0", 7_000_000, "funding", op_id="f1")
    # replays: refund.lua and adjust.lua answer them without moving money
    assert (await store.refund_sale(T, "L0", "b0", "again")).replay
    assert (await store.refund_sale(T, "L1", "b1", "again", kind="return")).replay
    assert (await store.reprice_sale(T, "L2", "b2", 40_000_000)).replay
    assert (await store.adjust(T, "c-b0", 7_000_000, "funding", op_id="f1")).replay
    await sales.accounts(store, *bs)  # a reload: the accounts exist, no opening again

    assert counted.money == await ledger_totals(redis)
    assert counted.money == {
        ("credit", "opening"): 5 * sales.OPENING,  # four clients and the wallet
        ("credit", "refund"): 25_000_000,
        ("credit", "return"): 25_000_000,
        ("credit", "fee_refund"): 2 * sales.FEE,
        ("debit", "reprice"): 5_000_000,
        ("credit", "reprice"): 6_500_000,
        ("credit", "funding"): 7_000_000,
    }




def _exposed(m: Metrics) -> dict[tuple[str, str], float]:
    body, _ = render(m.registry or CollectorRegistry())
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name.endswith("_total") and ("kind" in s.labels or "type" in s.labels):
                out[(s.name, s.labels.get("kind") or s.labels["type"])] = s.value
    return out


async def test_delivery_worker_counts_fee_refunds_reprices_and_delivery_failed(
    redis, buyers: Buyers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine's own bridge (engine.obs.telemetry) into a fresh Metrics: a rejected
    delivery refunds price and fee, a real-time price reprices, a sale too old to send is
    dead-lettered with a delivery_failed event; each counted once, also when the money
    effects are replayed (a job taken over by another worker)."""
    m = Metrics(CollectorRegistry())
    monkeypatch.setattr(telemetry, "METRICS", m)
    store = Store(redis, observer=telemetry.money_observer,
                  events_observer=telemetry.events_observer)
    ok = [ResponseRule(path="status", equals="accepted")]
    fast: dict[str, Any] = dict(secret=SECRET, accept=ok, timeout_ms=2000)
    rej = sales.buyer("rej", buyers.url + "/reject", **fast)
    price = sales.buyer("price", buyers.url + "/price", price_path="bid.price", **fast)
    old = sales.buyer("old", buyers.url + "/accept", max_age_s=60, **fast)
    await sales.accounts(store, rej, price, old)
    for b in (rej, price, old):
        await sales.sell(store, b, f"L-{b.id}")
    # the sale of "old" is older than its max_age_s in the worker's clock; the others'
    # are not (6 h by default)
    w = DeliveryWorker(Config(buyers=[rej, price, old]), store, tenants=[T], consumer="w1",
                       options=WorkerOptions(), clock=lambda: now_ms() + 61_000)
    try:
        assert await w.process_once() == 3
    finally:
        await w.close()
    assert buyers.at("/accept") == []

    events = await event_totals(redis)
    assert events["delivery_failed"] == 1
    got = _exposed(m)
    assert got[("leadflow_events_emitted_total", "delivery_failed")] == 1
    ledger = await ledger_totals(redis)
    assert ledger[("credit", "fee_refund")] == 2 * sales.FEE  # rej and old
    for (direction, kind), total in ledger.items():
        name = f"leadflow_money_{direction}ed_micros_total"
        assert got[(name, kind)] == total, (direction, kind)
    assert got[("leadflow_money_credited_micros_total", "reprice")] == 6_500_000

    # another worker replays the money effects of the recorded decisions: counted never
    for b in (rej, price, old):
        d = await read_decision(store, T, f"L-{b.id}", b.id)
        assert d is not None
        await record.apply_money(store, T, f"L-{b.id}", b.id, d,
                                  sale_price=money.parse(b.price))
    assert _exposed(m) == got


# -- leadflow worker --metrics-port ------------------------------------------------------------

def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == errno.ECONNREFUSED


async def test_worker_metrics_bind_to_settings_host_and_log_the_port(
    redis_server, tmp_path: Path
) -> None:
    """settings.host = 127.0.0.2: /metrics answers there and not on 127.0.0.1 (it listened
    on 0.0.0.0 whatever the settings said); --metrics-port 0 logs the port it got."""
    cfg = tmp_path / "leadflow.toml"
    cfg.write_text('[settings]\nhost = "127.0.0.2"\n' + BASE_TOML)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.run.cli", "worker", "deliver", "--config", str(cfg),
        "--redis-url", redis_server.url, "--metrics-port", "0",
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr is not None
    lines: list[bytes] = []
    try:
        logged: dict[str, Any] | None = None
        async with asyncio.timeout(30):  # each log line wakes the read: no polling
            while logged is None:
                line = await proc.stderr.readline()
                assert line, b"".join(lines).decode()  # EOF: the worker exited
                lines.append(line)
                rec = msgspec.json.decode(line)
                if rec.get("msg") == "worker metrics serving":
                    logged = rec
        port = int(logged["port"])
        assert port > 0 and logged["worker"] == "deliver"
        assert logged["url"] == f"http://127.0.0.2:{port}/metrics"

        def scrape() -> str:
            url = f"http://127.0.0.2:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())

        assert "leadflow_build_info" in await asyncio.to_thread(scrape)
        assert _refused("127.0.0.1", port)  # not on every address: only settings.host
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                _, rest = await proc.communicate()
            lines.append(rest or b"")
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, b"".join(lines).decode()


def test_request_and_lead_metrics_are_tallied_then_folded_in_bulk() -> None:
    """The per-request and per-lead observers count into plain dicts (prometheus-client's
    locked increments were 10 % of the engine's instructions per lead); /metrics folds
    them in before it renders, and so does every FOLD_EVERY-th request, which bounds the
    tally when nobody scrapes."""
    from engine.obs.metrics import METRICS

    telemetry.fold()
    received = METRICS.leads_received("fold-camp", "fold-sup", "accepted")._value
    errors = METRICS.leads_received("unknown", "unknown", "error")._value
    sold = METRICS.leads_sold("fold-camp", "fold-b")._value
    requests = METRICS.http_requests("/fold", "200")._value
    decisions = METRICS.decision_duration._sum
    before = (received.get(), errors.get(), sold.get(), requests.get(), decisions.get())
    telemetry.lead_observer("fold-camp", "fold-sup", "ACCEPTED", 0.25, [["fold-b", "1"]])
    telemetry.lead_observer("fold-camp", "fold-sup", "ACCEPTED", 0.5, [])
    telemetry.lead_observer("", "", "ERROR", 8.0, [])  # no decision: not in the histogram
    telemetry.http_observer("/fold", 200, 0.125)
    assert (received.get(), errors.get(), sold.get(), requests.get(),
            decisions.get()) == before  # tallied, not folded yet
    telemetry.fold()
    assert (received.get(), errors.get(), sold.get(), requests.get(), decisions.get()) == (
        before[0] + 2, before[1] + 1, before[2] + 1, before[3] + 1, before[4] + 0.75)
    for _ in range(telemetry.FOLD_EVERY):
        telemetry.http_observer("/fold", 200, 0.125)
    assert requests.get() == before[3] + 1 + telemetry.FOLD_EVERY  # folded by itself
    # the batch endpoint: one request, thousands of leads; the leads count towards a fold
    # too (the memory benchmark grew 13 % over 1M leads when only requests did)
    for _ in range(telemetry.FOLD_EVERY):
        telemetry.lead_observer("fold-camp", "fold-sup", "ACCEPTED", 0.25, [])
    assert received.get() == before[0] + 2 + telemetry.FOLD_EVERY
