"""Auto recharge: the events consumer, crash recovery, caps, schedule mode."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from billing import recharge
from billing.attempts import ChargeAttempt, Charger
from billing.context import BillingContext
from billing.stripe_gateway import StripeGateway
from engine.core import keys, money
from engine.core.billing_errors import InvalidRequest, PaymentTransient
from engine.core.config import AutoRecharge
from tests.helpers.billing_fixtures import T, make_config, new_ctx
from tests.helpers.stripe_fixture import DECLINES, NEEDS_AUTH, LocalStripe

D = money.MICROS
AUTO = AutoRecharge(enabled=True, threshold="20.00", amount="100.00", max_per_day=3,
                    max_amount_per_day="1000.00")


class Killed(Exception):
    """Stands for the worker process dying at a given step."""


async def _ctx(redis: aioredis.Redis, gateway: StripeGateway, auto: AutoRecharge = AUTO,
               **kw: object) -> BillingContext:
    return await new_ctx(redis, gateway, make_config(auto=auto), **kw)  # type: ignore[arg-type]


async def _drop_below_threshold(ctx: BillingContext, account: str = "c1", n: int = 0) -> None:
    """$30 credited, then $15 of usage: the balance crosses the $20 threshold."""
    await ctx.store.adjust(T, account, 30 * D, "adjustment", op_id=f"seed-{n}")
    await ctx.store.adjust(T, account, -15 * D, "usage", op_id=f"use-{n}")


async def _events(redis: aioredis.Redis, etype: str | None = None) -> list[dict[str, str]]:
    out = [{k.decode(): v.decode() for k, v in f.items()}
           for _, f in await redis.xrange(keys.events(T))]
    return [e for e in out if etype is None or e["type"] == etype]


async def _balance(ctx: BillingContext, account: str = "c1") -> int:
    state = await ctx.store.account(T, account)
    assert state is not None
    return state.balance


async def _process(ctx: BillingContext, consumer: str = "w1", idle: int = 60_000) -> int:
    return await recharge.process_once(ctx.config, ctx.store, ctx.gateway, consumer=consumer,
                                       claim_idle_ms=idle, ctx=ctx)


async def test_threshold_recharge_credits_resumes_and_reports(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.store.set_account_flag(T, "c1", "paused", "floor")
    await _drop_below_threshold(ctx)
    assert [e["type"] for e in await _events(redis, "recharge_needed")] == ["recharge_needed"]
    assert await _process(ctx) >= 1
    assert await _balance(ctx) == 115 * D
    ok = await _events(redis, "recharge_succeeded")
    assert len(ok) == 1 and ok[0]["account"] == "c1" and ok[0]["amount"] == str(100 * D)
    assert await _events(redis, "buyer_resumed")  # Lua resumed the paused account
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.paused == ""
    _, entry = (await ctx.store.ledger_page(T, "c1", limit=1))[0]
    assert entry["kind"] == "recharge" and entry["gross"] == "103.00"
    assert entry["card_fee"] == "3.00" and entry["ref"] == ok[0]["payment_intent"]
    # nothing left pending, non-recharge events acknowledged too
    pending = await redis.xpending(keys.events(T), recharge.GROUP)
    assert pending["pending"] == 0
    audit = await redis.xrange(keys.charge_audit(T))
    assert [f[b"step"] for _, f in audit][-1] == b"credited"


async def test_duplicated_event_charges_once(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(ctx)
    first = (await _events(redis, "recharge_needed"))[0]
    await redis.xadd(keys.events(T), first)  # the same event, published twice
    await _process(ctx)
    await _process(ctx)
    assert await _balance(ctx) == 115 * D
    cus = await ctx.methods.customer(T, "c1")
    assert [p.status for p in localstripe.intents(customer=cus)] == ["succeeded"]
    assert len(await _events(redis, "recharge_succeeded")) == 1


async def _charged_once(ctx: Any, redis: aioredis.Redis, localstripe: LocalStripe) -> None:
    """One $100 recharge credited, one PaymentIntent, one success event, nothing pending."""
    assert await _balance(ctx) == 115 * D
    cus = await ctx.methods.customer(T, "c1")
    assert [p.status for p in localstripe.intents(customer=cus)] == ["succeeded"]
    assert len(await _events(redis, "recharge_succeeded")) == 1
    assert (await redis.xpending(keys.events(T), recharge.GROUP))["pending"] == 0


@pytest.mark.parametrize("step", ["before_charge", "after_charge", "before_credit"])
async def test_worker_killed_mid_charge_resumes_same_attempt(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe,
        step: str) -> None:
    async def die(name: str, a: ChargeAttempt) -> None:
        if name == step:
            raise Killed(step)

    dying = await _ctx(redis, gateway, hook=die)
    await dying.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(dying)
    with pytest.raises(Killed):
        await _process(dying, consumer="w1")
    recorded = await redis.keys(keys.attempt(T, "rc:*"))
    assert len(recorded) == 1  # the attempt was recorded before Stripe was called
    # a fresh worker (another consumer) takes the pending entry over and finishes it
    fresh = await _ctx(redis, gateway)
    await _process(fresh, consumer="w2", idle=0)
    await _charged_once(fresh, redis, localstripe)


async def test_an_attempt_left_behind_is_resumed_and_credited_once(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """Stripe charged, then the credit failed at every delivery of the event until it was
    dead-lettered: the money is taken and nothing would credit it. The worker's periodic
    pass finds the attempt unfinished and credits it, once, without charging again."""
    outage = True

    async def flaky_credit(name: str, a: ChargeAttempt) -> None:
        if outage and name == "before_credit":
            raise PaymentTransient("store hiccup")

    ctx = await _ctx(redis, gateway, hook=flaky_credit)
    await ctx.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(ctx)
    for _ in range(recharge.MAX_DELIVERIES + 1):
        await _process(ctx, idle=0)
    assert len(await redis.xrange(keys.dead_letter(T, "events"))) == 1
    assert await _balance(ctx) == 15 * D  # charged at Stripe, not credited
    assert await recharge.resume_stale(ctx, idle_ms=60_000) == []  # not stale yet
    outage = False
    (done,) = await recharge.resume_stale(ctx, idle_ms=0)
    assert done.state == "credited" and await _balance(ctx) == 115 * D
    cus = await ctx.methods.customer(T, "c1")
    assert [p.status for p in localstripe.intents(customer=cus)] == ["succeeded"]
    assert len(await _events(redis, "recharge_succeeded")) == 1
    assert await recharge.resume_stale(ctx, idle_ms=0) == []  # nothing left open
    assert await redis.zcard(keys.open_attempts(T)) == 0


async def test_declined_primary_uses_activated_backup(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    backup = await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.methods.activate(T, "c1", backup.id)
    await _drop_below_threshold(ctx)
    await _process(ctx)
    assert await _balance(ctx) == 115 * D
    [ok] = await _events(redis, "recharge_succeeded")
    a = await ctx.charger.load(T, ok["ref"])
    assert a is not None and [c.state for c in a.cards] == ["declined", "succeeded"]


async def test_all_cards_declined_reports_failure(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    b = await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    await ctx.methods.activate(T, "c1", b.id)
    await _drop_below_threshold(ctx)
    await _process(ctx)
    assert await _balance(ctx) == 15 * D
    [failed] = await _events(redis, "recharge_failed")
    assert failed["reason"] == "all_cards_failed"
    assert (await redis.xpending(keys.events(T), recharge.GROUP))["pending"] == 0


async def test_a_new_card_after_a_failed_recharge_recharges_now(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """Below the threshold with the recharge failed, no debit crosses it again: the card
    the customer adds (or turning auto-recharge on while below) asks for one at once."""
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    await _drop_below_threshold(ctx)
    await _process(ctx)
    assert await _balance(ctx) == 15 * D and len(await _events(redis, "recharge_failed")) == 1
    good = await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.methods.set_primary(T, "c1", good.id)
    assert await recharge.recharge_if_below(ctx, T, "c1", why="card_added")
    await _process(ctx)
    assert await _balance(ctx) == 115 * D
    assert len(await _events(redis, "recharge_succeeded")) == 1
    # above the threshold now: nothing more is asked for
    assert not await recharge.recharge_if_below(ctx, T, "c1", why="card_added")


async def test_a_card_added_while_an_attempt_is_unfinished_still_recharges(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """The worker died before Stripe answered an attempt on a declining card; the card the
    customer adds then resumes that attempt (one open recharge per account), which fails
    on its old card list. The new card's event used to end there, the balance left below
    the threshold with a good card on file; it now gets its own attempt."""
    async def die(name: str, a: ChargeAttempt) -> None:
        if name == "before_charge":
            raise Killed(name)

    dying = await _ctx(redis, gateway, hook=die)
    await dying.methods.attach(T, "c1", localstripe.card(DECLINES))
    await _drop_below_threshold(dying)
    with pytest.raises(Killed):
        await _process(dying, consumer="w1")
    ctx = await _ctx(redis, gateway)
    good = await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.methods.set_primary(T, "c1", good.id)
    a = await recharge.recharge(ctx, T, "c1", attempt_id="rc:card-added", reason="card_added")
    assert a is not None and a.id == "rc:card-added" and a.state == "credited"
    assert await _balance(ctx) == 115 * D
    assert len(await _events(redis, "recharge_succeeded")) == 1


async def test_turning_auto_recharge_on_below_the_threshold_recharges(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway, auto=AutoRecharge(enabled=False))
    await ctx.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(ctx)  # $15: below $20, but auto-recharge is off
    assert await _events(redis, "recharge_needed") == []
    await recharge.configure(ctx, T, "c1", AUTO)
    assert len(await _events(redis, "recharge_needed")) == 1
    await _process(ctx)
    assert await _balance(ctx) == 115 * D


async def test_auto_recharge_turned_on_lifts_a_min_balance_pause_and_off_makes_one(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """Seeds: below its minimum balance *without* auto-recharge a buyer is paused. Turning
    auto-recharge on through the API left the pause until a recharge credited the account;
    it is lifted at once now (buyer_resumed). Turning it off below the minimum pauses the
    account at once (buyer_paused), where it used to keep buying until the next crossing."""
    cfg = make_config(auto=AutoRecharge(enabled=False), min_balance="50.00")
    ctx = await new_ctx(redis, gateway, cfg)
    await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.store.adjust(T, "c1", 60 * D, "adjustment", op_id="seed")
    await ctx.store.adjust(T, "c1", -15 * D, "usage", op_id="use")  # $45: below $50
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.paused == "min_balance"
    seen = len(await _events(redis))
    await recharge.configure(ctx, T, "c1", AUTO)
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.paused == "" and state.auto_recharge
    assert [(e["type"], e["account"]) for e in (await _events(redis))[seen:]] == [
        ("buyer_resumed", "c1")]  # $45 is above the $20 threshold: no recharge_needed
    seen += 1
    await recharge.configure(ctx, T, "c1", AutoRecharge(enabled=False))
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.paused == "min_balance" and not state.auto_recharge
    assert [(e["type"], e["account"], e["reason"]) for e in (await _events(redis))[seen:]] == [
        ("buyer_paused", "c1", "min_balance")]
    assert await _balance(ctx) == 45 * D  # moves no money


async def test_authentication_required_needs_the_customer(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card(NEEDS_AUTH))
    await _drop_below_threshold(ctx)
    await _process(ctx)
    [failed] = await _events(redis, "recharge_failed")
    assert failed["reason"] == "authentication_required"
    # redelivering the same event never retries the card
    a = await ctx.charger.load(T, failed["ref"])
    assert a is not None and a.state == "needs_customer"
    await recharge.recharge(ctx, T, "c1", attempt_id=a.id, reason="threshold")
    cus = await ctx.methods.customer(T, "c1")
    assert len(localstripe.intents(customer=cus)) == 1


async def test_daily_caps(redis: aioredis.Redis, gateway: StripeGateway,
                          localstripe: LocalStripe) -> None:
    auto = AutoRecharge(enabled=True, threshold="20.00", amount="100.00", max_per_day=2,
                        max_amount_per_day="1000.00")
    ctx = await _ctx(redis, gateway, auto)
    await ctx.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(ctx)
    await _process(ctx)
    for n in range(2):
        bal = await _balance(ctx)
        await ctx.store.adjust(T, "c1", -(bal - 15 * D), "usage", op_id=f"drain-{n}")
        await _process(ctx)
    assert len(await _events(redis, "recharge_succeeded")) == 2
    [capped] = await _events(redis, "recharge_failed")
    assert capped["reason"] == "daily_cap"
    # amount cap: $150/day allows one $100 recharge only
    auto2 = AutoRecharge(enabled=True, threshold="20.00", amount="100.00", max_per_day=5,
                         max_amount_per_day="150.00")
    await recharge.configure(ctx, T, "c1", auto2)
    await redis.delete(keys.rstate(T, "c1"))
    a = await recharge.recharge(ctx, T, "c1", attempt_id="x1", reason="manual")
    b = await recharge.recharge(ctx, T, "c1", attempt_id="x2", reason="manual")
    assert a is not None and a.state == "credited" and b is None


async def test_card_retry_budget(redis: aioredis.Redis, gateway: StripeGateway,
                                 localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    ctx.charger = Charger(ctx.store, gateway, max_card_tries=2)
    await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    results = []
    for n in range(3):
        a = await recharge.recharge(ctx, T, "c1", attempt_id=f"r{n}", reason="manual")
        assert a is not None
        results.append(a.cards[0].code)
    assert results == ["card_declined", "card_declined", "retry_limit"]
    cus = await ctx.methods.customer(T, "c1")
    assert len(localstripe.intents(customer=cus)) == 2


async def test_dead_letter_never_drops(redis: aioredis.Redis, gateway: StripeGateway,
                                       localstripe: LocalStripe) -> None:
    ctx = await _ctx(redis, gateway)
    await redis.xadd(keys.events(T), {"type": "recharge_needed", "account": "ghost",
                                      "balance": "0", "ts": "1"})
    await ctx.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(ctx)
    # c1 stays busy (another process holds its lock): retried, then dead-lettered
    lock = redis.lock(keys.rlock(T, "c1"), timeout=60)
    assert await lock.acquire()
    for _ in range(recharge.MAX_DELIVERIES + 1):
        await _process(ctx, idle=0)
    await lock.release()
    dead = await redis.xrange(keys.dead_letter(T, "events"))
    assert sorted(f[b"account"] for _, f in dead) == [b"c1", b"ghost"]
    assert all(b"error" in f and b"source_id" in f for _, f in dead)
    assert (await redis.xpending(keys.events(T), recharge.GROUP))["pending"] == 0


async def test_schedule_mode(redis: aioredis.Redis, gateway: StripeGateway,
                             localstripe: LocalStripe) -> None:
    auto = AutoRecharge(enabled=True, amount="100.00", every_days=30)
    ctx = await _ctx(redis, gateway, auto)
    await ctx.methods.attach(T, "c2", localstripe.card())
    now = 1_900_000_000_000
    done = await recharge.run_scheduled(ctx, now=now)
    assert [a.account for a in done] == ["c2"]  # the others have no card: no attempt
    assert await _balance(ctx, "c2") == 100 * D
    assert await recharge.run_scheduled(ctx, now=now + 86_400_000) == []
    again = await recharge.run_scheduled(ctx, now=now + 31 * 86_400_000)
    assert [a.account for a in again] == ["c2"]
    # schedule mode never reacts to the threshold
    await _drop_below_threshold(ctx, "c2")
    assert await _events(redis, "recharge_needed") == []


async def test_settings_minimums(ctx: BillingContext, localstripe: LocalStripe) -> None:
    await ctx.methods.attach(T, "c1", localstripe.card())
    for bad in (AutoRecharge(enabled=True, threshold="19.99"),
                AutoRecharge(enabled=True, amount="99.99"),
                AutoRecharge(enabled=True, amount="100.001"),
                AutoRecharge(enabled=True, max_amount_per_day="50.00"),
                AutoRecharge(enabled=True, max_per_day=0),
                AutoRecharge(enabled=True, every_days=0)):
        with pytest.raises(InvalidRequest):
            await recharge.configure(ctx, T, "c1", bad)
    assert await ctx.store.redis.get(keys.autorecharge(T, "c1")) is None
    ok = await recharge.configure(ctx, T, "c1", AutoRecharge(enabled=True, threshold="20.00",
                                                             amount="100.00"))
    assert ok.enabled
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.auto_recharge and state.recharge_threshold == 20 * D


async def test_run_recharge_worker_loop(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    import asyncio

    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card())
    stop = asyncio.Event()
    task = asyncio.create_task(recharge.run_recharge_worker(
        ctx.config, ctx.store, gateway, consumer="loop", stop=stop))
    await _drop_below_threshold(ctx)

    async def credited() -> None:
        while not await _events(redis, "recharge_succeeded"):  # noqa: ASYNC110 - polls redis
            await asyncio.sleep(0.01)

    await asyncio.wait_for(credited(), 20)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert await _balance(ctx) == 115 * D


async def test_worker_reads_every_tenant_and_a_slow_one_delays_no_other(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """On one Redis the worker reads every tenant's events with one blocking read, and
    handles each tenant in its own task: acme's payment is held at its Stripe call while
    beta's crossing is charged and credited."""
    import asyncio

    base = make_config(auto=AUTO)
    beta = msgspec.structs.replace(base.tenants[0], id="beta", api_token="tok-beta")
    cfg = msgspec.structs.replace(base, tenants=[*base.tenants, beta], clients=[
        *base.clients, msgspec.structs.replace(base.clients[0], tenant="beta")])
    release = asyncio.Event()

    async def hold_acme(step: str, a: ChargeAttempt) -> None:
        if a.tenant == T and step == "before_charge":
            await release.wait()

    ctx = await new_ctx(redis, gateway, cfg, hook=hold_acme)
    for tenant in (T, "beta"):
        await ctx.methods.attach(tenant, "c1", localstripe.card())
    stop = asyncio.Event()
    task = asyncio.create_task(recharge.run_recharge_worker(
        cfg, ctx.store, gateway, consumer="loop", stop=stop, hook=hold_acme))

    async def grouped() -> None:
        while not await redis.exists(keys.events("beta")):  # noqa: ASYNC110 - polls redis
            await asyncio.sleep(0.01)

    await asyncio.wait_for(grouped(), 10)
    # beta's stream (and its consumer group) vanish under the running reader: the next
    # crossing re-creates the stream without a group, and the reader re-creates the group
    await redis.delete(keys.events("beta"))
    for tenant in (T, "beta"):
        await ctx.store.adjust(tenant, "c1", 30 * D, "adjustment", op_id="seed")
        await ctx.store.adjust(tenant, "c1", -15 * D, "usage", op_id="use")

    async def succeeded(tenant: str) -> None:
        while not [f for _, f in await redis.xrange(keys.events(tenant))  # noqa: ASYNC110
                   if f[b"type"] == b"recharge_succeeded"]:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(succeeded("beta"), 20)
    assert (await ctx.store.account(T, "c1")).balance == 15 * D  # type: ignore[union-attr]
    release.set()
    await asyncio.wait_for(succeeded(T), 20)
    stop.set()
    await asyncio.wait_for(task, 5)
    for tenant in (T, "beta"):
        assert (await ctx.store.account(tenant, "c1")).balance == 115 * D  # type: ignore[union-attr]


def test_gateway_reads_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from billing.stripe_gateway import ENV_KEY
    from engine.core.billing_errors import PaymentError

    monkeypatch.delenv(ENV_KEY, raising=False)
    with pytest.raises(PaymentError) as err:
        StripeGateway()
    assert err.value.code == "stripe_not_configured"
    monkeypatch.setenv(ENV_KEY, "sk_test_secret_value")
    gw = StripeGateway(api_base="http://127.0.0.1:1")
    assert "sk_test_secret_value" not in repr(gw)


async def test_a_new_crossing_resumes_the_unfinished_recharge_instead_of_a_second_one(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """A recharge's worker dies before Stripe answers; a manual credit then lifts the
    balance over the threshold and usage crosses it again. The second crossing's event must
    not start a second attempt (its own idempotency key: a second charge once the first
    attempt is resumed): it resumes the open one. One charge, one credit."""
    async def die(name: str, a: ChargeAttempt) -> None:
        if name == "before_charge":
            raise Killed(name)

    dying = await _ctx(redis, gateway, hook=die)
    await dying.methods.attach(T, "c1", localstripe.card())
    await _drop_below_threshold(dying)  # $15: the first crossing
    with pytest.raises(Killed):
        await _process(dying, consumer="w1")
    await dying.store.adjust(T, "c1", 50 * D, "funding", op_id="credit:c1:wire-1",
                             extra={"process": "manual"})  # $65: the threshold re-arms
    await dying.store.adjust(T, "c1", -50 * D, "usage", op_id="use-2")  # $15: crossed again
    assert len(await _events(redis, "recharge_needed")) == 2
    fresh = await _ctx(redis, gateway)
    await _process(fresh, consumer="w2")  # the new crossing (w1's entry is not idle yet)
    await _process(fresh, consumer="w2", idle=0)  # then w1's, taken over
    await _charged_once(fresh, redis, localstripe)


async def test_recharge_outcomes_are_counted(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """leadflow_recharge_attempts_total and leadflow_recharge_latency_seconds were never
    recorded (the recharge alerts could not fire), nor the recharge events."""
    from engine.obs.metrics import METRICS

    def value(metric: Any) -> float:
        return float(metric._value.get())

    def latency_count() -> float:
        return sum(s.value for m in METRICS.recharge_latency.collect() for s in m.samples
                   if s.name.endswith("_count"))

    ok, declined = METRICS.recharge_attempts("succeeded"), METRICS.recharge_attempts("declined")
    events = METRICS.events_emitted("recharge_succeeded")
    before = (value(ok), value(declined), value(events), latency_count())
    ctx = await _ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    await _drop_below_threshold(ctx)
    await _process(ctx)
    assert value(declined) == before[1] + 1 and value(ok) == before[0]
    good = await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.methods.set_primary(T, "c1", good.id)
    assert await recharge.recharge_if_below(ctx, T, "c1", why="card_added")
    await _process(ctx)
    assert await _balance(ctx) == 115 * D
    assert (value(ok), value(events), latency_count()) == (
        before[0] + 1, before[2] + 1, before[3] + 1)
    await _process(ctx)  # nothing new: nothing counted twice
    assert (value(ok), value(declined)) == (before[0] + 1, before[1] + 1)
