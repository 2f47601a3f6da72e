"""The account lock and Stripe's idempotency conflicts, against redis + localstripe.

A charge is resumed by whoever holds the account's lock; these tests drive the
interleavings through the Charger's ``hook`` (a step awaits, or another worker acts there)
and the lock's ``renewed`` event: nothing here waits on a clock.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis
import stripe

from billing import funding, recharge
from billing.attempts import AccountLock, ChargeAttempt
from billing.stripe_gateway import StripeGateway, _map
from engine.core import keys, money
from engine.core.billing_errors import Busy, PaymentError, PaymentTransient
from engine.core.config import AutoRecharge
from tests.helpers.billing_fixtures import T, make_config, new_ctx
from tests.helpers.stripe_fixture import LocalStripe

D = money.MICROS
AUTO = AutoRecharge(enabled=True, threshold="20.00", amount="100.00", max_per_day=3,
                    max_amount_per_day="1000.00")


# -- Stripe's idempotency conflicts are "busy", never a decline -----------------------------

async def test_a_409_from_stripe_is_busy_not_a_card_failure(gateway: StripeGateway) -> None:
    """A real 409 through the real SDK: localstripe answers 409 for an id it already holds,
    as Stripe does for an idempotency key still in use by another request. That is
    "try again later" (a PaymentTransient), never a card failure that moves to a backup."""
    params = {"id": f"dup-{uuid.uuid4().hex}", "percent_off": 10, "duration": "once"}
    await gateway._call(gateway._client.v1.coupons.create, params=params)
    with pytest.raises(PaymentError) as err:
        await gateway._call(gateway._client.v1.coupons.create, params=params)
    assert isinstance(err.value, PaymentTransient)
    assert (err.value.code, err.value.status) == ("busy", 409)


def test_an_idempotency_error_is_busy_not_a_card_failure() -> None:
    """What the SDK raises for a key reused with other parameters (type idempotency_error)."""
    body = {"error": {"type": "idempotency_error", "message": "Keys for idempotent requests "
                      "can only be used with the same parameters they were first used with."}}
    exc = stripe.IdempotencyError(body["error"]["message"], json.dumps(body), 400, body, {})
    mapped = _map(exc)
    assert isinstance(mapped, PaymentTransient) and mapped.code == "busy"


async def test_a_busy_charge_stays_pending_and_never_moves_to_the_backup(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """Stripe answers 409 "key in use" to the primary's charge: the attempt keeps that card
    charging, the event stays pending, and the next delivery charges the primary once."""
    in_use = stripe.APIError("There is currently another in-progress request using this "
                             "idempotent key.", None, 409,
                             {"error": {"code": "idempotency_key_in_use"}}, {})
    busy = True

    async def conflict(step: str, a: ChargeAttempt) -> None:
        if busy and step == "before_charge":
            raise _map(in_use)  # what StripeGateway.charge raises on that answer

    ctx = await new_ctx(redis, gateway, make_config(auto=AUTO), hook=conflict)
    primary = await ctx.methods.attach(T, "c1", localstripe.card())
    backup = await ctx.methods.attach(T, "c1", localstripe.card())
    await ctx.methods.activate(T, "c1", backup.id)
    await ctx.store.adjust(T, "c1", 30 * D, "adjustment", op_id="seed")
    await ctx.store.adjust(T, "c1", -15 * D, "usage", op_id="use")
    await recharge.process_once(ctx.config, ctx.store, gateway, consumer="w1", ctx=ctx)
    [attempt_id] = [k.decode().rsplit("attempt:", 1)[1]
                    for k in await redis.keys(keys.attempt(T, "rc:*"))]
    a = await ctx.charger.load(T, attempt_id)
    assert a is not None and a.state == "charging" and a.index == 0
    assert [c.state for c in a.cards] == ["charging", "pending"]
    assert (await redis.xpending(keys.events(T), recharge.GROUP))["pending"] == 1
    busy = False
    await recharge.process_once(ctx.config, ctx.store, gateway, consumer="w1",
                                claim_idle_ms=0, ctx=ctx)
    done = await ctx.charger.load(T, attempt_id)
    assert done is not None and done.state == "credited"
    assert [c.state for c in done.cards] == ["succeeded", "pending"]
    cus = await ctx.methods.customer(T, "c1")
    assert [(p.payment_method, p.status) for p in localstripe.intents(customer=cus)] == [
        (primary.id, "succeeded")]


# -- the account lock is renewed while held, and a holder that lost it stops ----------------

async def test_the_lock_is_renewed_while_held(redis: aioredis.Redis) -> None:
    """A holder keeps its lock past the TTL: the TTL is reset every third of it."""
    key = keys.rlock(T, "c1")
    async with AccountLock(redis, T, "c1", ttl_s=60, renew_every_s=0.01) as lock:
        await redis.pexpire(key, 500)  # as if 59.5 s of the TTL had gone by
        for _ in range(2):  # the second renewal surely started after the PEXPIRE
            lock.renewed.clear()
            await asyncio.wait_for(lock.renewed.wait(), 10)
        assert await redis.pttl(key) > 50_000
        with pytest.raises(Busy):
            async with AccountLock(redis, T, "c1"):
                pass
    assert await redis.exists(key) == 0  # released on exit


async def test_a_lost_lock_is_noticed_and_not_renewed(redis: aioredis.Redis) -> None:
    key = keys.rlock(T, "c1")
    async with AccountLock(redis, T, "c1", ttl_s=60) as lock:
        await redis.delete(key)  # expired (a pause past the TTL) ...
        async with AccountLock(redis, T, "c1") as other:  # ... and taken over
            with pytest.raises(Busy):
                await lock.check()
            assert lock.lost
            await other.check()  # the new holder's lock is intact
            assert await redis.pttl(key) > 0


async def test_a_worker_that_lost_the_lock_stops_before_charging(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """Worker A's lock expired while it was about to call Stripe and worker B took the
    account over: A stops (Busy) without charging, and the attempt, resumed by the lock's
    holder, is charged once."""
    taken: list[AccountLock] = []

    async def expire_and_take_over(step: str, a: ChargeAttempt) -> None:
        if step == "before_charge" and not taken:
            await redis.delete(keys.rlock(T, "c1"))
            taken.append(await AccountLock(redis, T, "c1").__aenter__())

    a_ctx = await new_ctx(redis, gateway, hook=expire_and_take_over)
    await a_ctx.methods.attach(T, "c1", localstripe.card())
    with pytest.raises(Busy):
        await funding.fund(a_ctx, T, "c1", 100 * D, "order-1")
    cus = await a_ctx.methods.customer(T, "c1")
    assert localstripe.intents(customer=cus) == []  # A never reached Stripe
    a = await a_ctx.charger.load(T, "fund:c1:order-1")
    assert a is not None and a.state == "charging"
    await taken[0].__aexit__(None, None, None)
    b_ctx = await new_ctx(redis, gateway)
    done = await funding.fund(b_ctx, T, "c1", 100 * D, "order-1")  # the client's retry
    assert done.state == "credited"
    assert [p.status for p in localstripe.intents(customer=cus)] == ["succeeded"]
    assert (await b_ctx.store.account(T, "c1")).balance == 100 * D  # type: ignore[union-attr]


async def test_a_refund_whose_lock_was_lost_stops_and_is_finished_by_a_rerun(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """refund-balance's lock expired just before its Stripe refund and another worker took
    the account: it refunds nothing (Busy); a later run refunds the balance once."""
    ctx = await new_ctx(redis, gateway)
    await ctx.methods.attach(T, "c1", localstripe.card())
    a = await funding.fund(ctx, T, "c1", 100 * D, "f1")
    taken: list[AccountLock] = []

    async def expire_and_take_over(step: str, account: str) -> None:
        if step == "before_refund" and not taken:
            await redis.delete(keys.rlock(T, "c1"))
            taken.append(await AccountLock(redis, T, "c1").__aenter__())

    ctx.refund_hook = expire_and_take_over
    with pytest.raises(Busy):
        await funding.refund_balance(ctx, T, "c1")
    assert await gateway.list_refunds(a.pi) == []
    await taken[0].__aexit__(None, None, None)
    await funding.refund_balance(ctx, T, "c1")
    assert [cents for _, cents, _ in await gateway.list_refunds(a.pi)] == [10_000]
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.closed and state.balance == 0
