"""Auto-recharge latency: a threshold crossing until the wallet is credited, with localstripe.

``python -m bench recharge [--crossings 20]``

An embedded redis-server and a localstripe server (the fake Stripe the billing tests use)
are started; the example config's ``acme/sunpower-direct`` account (auto recharge: threshold
$100, amount $500) gets a card and a higher daily cap (``billing.recharge.configure``), and
the recharge worker (``run_recharge_worker``, as ``leadflow worker recharge`` runs it, with the
example config's two tenants) runs alongside. Each crossing is one ``Store.adjust`` usage debit
that takes the balance from above the threshold to $1 below it; the latency is the
``ts`` of the ``recharge_needed`` event to the ``ts`` of the ledger entry of the recharge
credit (attempt ``rc:<event id>``). Crossings come at random moments (a random 0-0.6 s pause
before each), not in step with the worker's polling. Cards are rotated every few crossings,
so the 10 tries per card per 30 days limit never refuses one.

Ceiling: one off-session PaymentIntent create+confirm through the same gateway
(``StripeGateway.charge``: the stripe SDK in a worker thread) against the same localstripe.
Ratio = ceiling p50 / crossing p50 (1.0 = the recharge costs no more than the charge itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import stripe

from bench import common
from bench.localstripe import API_KEY, serve_localstripe
from billing import recharge as rc
from billing.context import BillingContext
from billing.stripe_gateway import StripeGateway
from engine.core import keys, money
from engine.core.config import AutoRecharge, Config
from engine.run.provision import provision_accounts
from engine.store.embedded import EmbeddedRedis
from engine.store.store import Store, connect

VISA = "4242424242424242"
TENANT, ACCOUNT = "acme", "sunpower-direct"
SEED = 66
JITTER_S = 0.6  # a random pause before each crossing
CARD_EVERY = 5  # a fresh primary card every N crossings (10 tries per card per 30 days)


def localstripe(timeout: float = 20.0) -> contextlib.AbstractContextManager[str]:
    """A localstripe server on a free port (no persistence); yields its base URL."""
    return serve_localstripe(timeout)


def _new_card(client: stripe.StripeClient) -> str:
    pm = client.v1.payment_methods.create(params={
        "type": "card",
        "card": {"number": VISA, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
    })
    return str(pm.id)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _card(ctx: BillingContext, client: stripe.StripeClient) -> str:
    pm = await asyncio.to_thread(_new_card, client)
    await ctx.methods.attach(TENANT, ACCOUNT, pm)
    await ctx.methods.set_primary(TENANT, ACCOUNT, pm)
    return pm


async def _wait_credit(store: Store, attempt: str, within: float) -> dict[str, str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for _, entry in await store.ledger_page(TENANT, ACCOUNT, limit=5):
            if entry.get("kind") == "recharge" and entry.get("attempt") == attempt:
                return entry
        await asyncio.sleep(0.005)  # polling only paces the loop; latency comes from ts fields
    raise TimeoutError(f"recharge {attempt} not credited within {within}s")


async def _crossing(store: Store, threshold: int, i: int) -> tuple[str, int]:
    """Debit the account from above the threshold to $1 below it; (event id, event ts)."""
    state = await store.account(TENANT, ACCOUNT)
    assert state is not None
    if state.balance < threshold:
        raise RuntimeError(f"balance {state.balance} below the threshold before crossing {i}")
    delta = state.balance - threshold + money.MICROS
    res = await store.adjust(TENANT, ACCOUNT, -delta, "usage", op_id=f"bench-cross-{i}")
    if not res.ok:
        raise RuntimeError(f"crossing debit refused: {res.error}")
    rows = await store.redis.xrevrange(keys.events(TENANT), count=20)
    for raw_id, fields in rows:
        if fields.get(b"type") == b"recharge_needed" and fields.get(b"account") == ACCOUNT.encode():
            return raw_id.decode(), int(fields[b"ts"])
    raise RuntimeError("no recharge_needed event after the crossing")


async def _main(cfg: Config, redis_url: str, stripe_url: str, crossings: int,
                say: Any) -> dict[str, Any]:
    store = Store(connect(redis_url))
    gateway = StripeGateway(API_KEY, api_base=stripe_url)
    client = stripe.StripeClient(API_KEY, base_addresses={"api": stripe_url},
                                 max_network_retries=0)
    stop = asyncio.Event()
    worker: asyncio.Task[None] | None = None
    try:
        await store.load_scripts()
        await provision_accounts(cfg, store)
        ctx = BillingContext(cfg, store, gateway)
        base = ctx.settings(TENANT, ACCOUNT).auto_recharge
        ar = AutoRecharge(enabled=True, threshold=base.threshold, amount=base.amount,
                          max_per_day=100, max_amount_per_day="1000000.00")
        await _card(ctx, client)
        await rc.configure(ctx, TENANT, ACCOUNT, ar)
        threshold = money.parse(ar.threshold)
        worker = asyncio.create_task(rc.run_recharge_worker(cfg, store, gateway,
                                                            consumer="bench", stop=stop))
        latencies: list[float] = []
        rng = random.Random(SEED)
        for i in range(crossings):
            if i and i % CARD_EVERY == 0:
                await _card(ctx, client)
            # crossings come at random moments, not in step with the worker's polling
            await asyncio.sleep(rng.uniform(0, JITTER_S))
            event_id, event_ts = await _crossing(store, threshold, i)
            entry = await _wait_credit(store, f"rc:{event_id}", within=30.0)
            latencies.append((int(entry["ts"]) - event_ts) / 1000)
            say(f"recharge: crossing {i + 1}/{crossings}: {latencies[-1] * 1000:.0f} ms")
        # ceiling: the bare PaymentIntent create+confirm through the same gateway
        cus = await ctx.methods.customer(TENANT, ACCOUNT)
        pm = (await ctx.methods.chargeable(TENANT, ACCOUNT))[0].id
        charges: list[float] = []
        for i in range(crossings):
            t0 = time.perf_counter()
            await gateway.charge(customer=cus, payment_method=pm, amount_cents=51_500,
                                 idempotency_key=f"bench-ceiling-{i}-{time.time_ns()}",
                                 metadata={"purpose": "bench"})
            charges.append(time.perf_counter() - t0)
    finally:
        stop.set()
        if worker is not None:
            await worker
        await store.redis.aclose()
    p50, p99 = statistics.median(latencies), _pct(latencies, 0.99)
    c50, c99 = statistics.median(charges), _pct(charges, 0.99)
    return {
        "benchmark": "recharge",
        "crossings": crossings,
        "p50_s": round(p50, 4),
        "p99_s": round(p99, 4),
        "max_s": round(max(latencies), 4),
        "ceiling_p50_s": round(c50, 4),
        "ceiling_p99_s": round(c99, 4),
        "ratio": round(c50 / p50, 3) if p50 > 0 else None,
        "tenants": len(cfg.tenants),
        "latencies_s": [round(x, 4) for x in latencies],
        "machine": common.machine(),
    }


def run(*, crossings: int = 20, quiet: bool = False) -> dict[str, Any]:
    say = (lambda _m: None) if quiet else common.log
    cfg = common.load_config()
    with (localstripe() as stripe_url,
          tempfile.TemporaryDirectory(prefix="leadflow-bench-") as tmp,
          EmbeddedRedis(tmp, appendfsync="everysec") as srv):
        return asyncio.run(_main(cfg, srv.url, stripe_url, crossings, say))


def report(r: dict[str, Any]) -> None:
    print(f"crossing -> credited: p50 {r['p50_s'] * 1000:.0f} ms, p99 {r['p99_s'] * 1000:.0f} ms "
          f"({r['crossings']} crossings, recharge worker with {r['tenants']} tenants)")
    print(f"ceiling (one PaymentIntent create+confirm, same SDK): p50 "
          f"{r['ceiling_p50_s'] * 1000:.0f} ms, p99 {r['ceiling_p99_s'] * 1000:.0f} ms")
    print(f"ratio (ceiling p50 / crossing p50): {r['ratio']:.2f}")
    print(msgspec.json.encode(r).decode(), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench recharge",
                                description=__doc__.split("\n")[0])
    p.add_argument("--crossings", type=int, default=20)
    args = p.parse_args(argv)
    report(run(crossings=args.crossings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
