"""Funding by card, payment methods and balance refunds, against localstripe + redis."""

from __future__ import annotations

import pytest

from billing import funding
from billing.context import BillingContext
from engine.core import keys, money
from engine.core.billing_errors import (
    CardDeclined,
    InvalidRequest,
    NoPaymentMethod,
    PaymentsFailed,
)
from tests.helpers.billing_fixtures import T
from tests.helpers.stripe_fixture import ATTACH_DECLINED, DECLINES, NEEDS_AUTH, LocalStripe

D = money.MICROS


async def _balance(ctx: BillingContext, account: str = "c1") -> int:
    state = await ctx.store.account(T, account)
    assert state is not None
    return state.balance


async def _ledger(ctx: BillingContext, account: str = "c1") -> list[dict[str, str]]:
    return [f for _, f in reversed(await ctx.store.ledger_page(T, account))]


async def _events(ctx: BillingContext, etype: str) -> list[dict[str, str]]:
    rows = await ctx.store.redis.xrange(keys.events(T))
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows
            if f[b"type"] == etype.encode()]


async def test_fee_math_3_percent_on_100(ctx: BillingContext, localstripe: LocalStripe) -> None:
    await ctx.methods.attach(T, "c1", localstripe.card())
    a = await funding.fund(ctx, T, "c1", 100 * D, "order-1")
    assert a.state == "credited"
    pis = localstripe.intents(a.id, a.customer)
    assert [(p.amount, p.status) for p in pis] == [(10300, "succeeded")]  # $103 charged
    assert await _balance(ctx) == 100 * D  # $100 credited
    entry = (await _ledger(ctx))[-1]
    assert entry["kind"] == "funding" and entry["delta"] == str(100 * D)
    assert entry["gross"] == "103.00" and entry["card_fee"] == "3.00"
    assert entry["ref"] == pis[0].id
    # the same idempotency key again: no second charge, no second credit
    again = await funding.fund(ctx, T, "c1", 100 * D, "order-1")
    assert again.pi == a.pi and len(localstripe.intents(a.id, a.customer)) == 1
    assert await _balance(ctx) == 100 * D


def test_fee_rounding() -> None:
    assert funding.card_fee(100 * D, 300) == 3 * D
    assert funding.card_fee(100 * D, 0) == 0
    assert funding.card_fee(100 * D, 1500) == 15 * D
    assert funding.card_fee(123_450_000, 250) == 3_090_000  # 3.08625 -> 3.09


@pytest.mark.parametrize("amount", [99_990_000, 0, -100 * D, 100 * D + 1, 10**13])
async def test_funding_amount_rules(ctx: BillingContext, localstripe: LocalStripe,
                                    amount: int) -> None:
    await ctx.methods.attach(T, "c1", localstripe.card())
    with pytest.raises(InvalidRequest):
        await funding.fund(ctx, T, "c1", amount, f"bad-{amount}")
    assert await _balance(ctx) == 0
    assert await ctx.store.redis.exists(keys.attempt(T, f"fund:c1:bad-{amount}")) == 0


async def test_no_card_refused(ctx: BillingContext) -> None:
    with pytest.raises(NoPaymentMethod):
        await funding.fund(ctx, T, "c1", 100 * D, "k")
    assert await _balance(ctx) == 0


async def test_declined_primary_then_activated_backup(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    bad = await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    good = await ctx.methods.attach(T, "c1", localstripe.card())
    assert bad.primary and not good.active  # backups wait for activation (seed 004)
    with pytest.raises(PaymentsFailed):
        await funding.fund(ctx, T, "c1", 100 * D, "k1")
    await ctx.methods.activate(T, "c1", good.id)
    a = await funding.fund(ctx, T, "c1", 100 * D, "k2")
    assert [c.state for c in a.cards] == ["declined", "succeeded"]
    assert await _balance(ctx) == 100 * D
    statuses = sorted(p.status for p in localstripe.intents(a.id, a.customer))
    assert statuses == ["requires_payment_method", "succeeded"]


async def test_all_cards_declined(ctx: BillingContext, localstripe: LocalStripe) -> None:
    await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    b = await ctx.methods.attach(T, "c1", localstripe.card(DECLINES))
    await ctx.methods.activate(T, "c1", b.id)
    with pytest.raises(PaymentsFailed) as err:
        await funding.fund(ctx, T, "c1", 150 * D, "k")
    assert err.value.code == "payment_failed"
    assert await _balance(ctx) == 0
    assert await _ledger(ctx) == []


async def test_authentication_required_needs_customer(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    await ctx.methods.attach(T, "c1", localstripe.card(NEEDS_AUTH))
    with pytest.raises(PaymentsFailed) as err:
        await funding.fund(ctx, T, "c1", 100 * D, "k")
    assert err.value.needs_customer and err.value.code == "authentication_required"
    # the same request again never retries the card
    with pytest.raises(PaymentsFailed):
        await funding.fund(ctx, T, "c1", 100 * D, "k")
    assert len(localstripe.intents("fund:c1:k", await ctx.methods.customer(T, "c1"))) == 1
    assert await _balance(ctx) == 0


async def test_attach_declined_card(ctx: BillingContext, localstripe: LocalStripe) -> None:
    with pytest.raises(CardDeclined):
        await ctx.methods.attach(T, "c1", localstripe.card(ATTACH_DECLINED))
    assert await ctx.methods.all(T, "c1") == []


async def test_methods_primary_and_detach(ctx: BillingContext, localstripe: LocalStripe) -> None:
    a = await ctx.methods.attach(T, "c1", localstripe.card())
    b = await ctx.methods.attach(T, "c1", localstripe.card())
    c = await ctx.methods.attach(T, "c1", localstripe.card())
    with pytest.raises(InvalidRequest):
        await ctx.methods.deactivate(T, "c1", a.id)
    await ctx.methods.activate(T, "c1", c.id)
    ms = await ctx.methods.set_primary(T, "c1", b.id)
    assert [m.id for m in ms] == [b.id, a.id, c.id] and ms[0].primary and ms[0].active
    ms = await ctx.methods.detach(T, "c1", b.id)
    assert ms[0].id == a.id and ms[0].primary
    cards = await ctx.gateway.list_cards(await ctx.methods.customer(T, "c1"))
    assert {x.id for x in cards} == {a.id, c.id}
    raw = await ctx.store.redis.hget(keys.pay(T, "c1"), "methods")
    assert raw is not None and b"4242424242424242" not in raw


async def test_a_backup_never_activated_is_not_charged_when_the_primary_goes(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    """Seed 004: backups serve only once activated. Promoted by the primary's removal, a
    backup that was never activated is the primary but still not charged."""
    a = await ctx.methods.attach(T, "c1", localstripe.card())
    b = await ctx.methods.attach(T, "c1", localstripe.card())
    assert [(m.id, m.active) for m in await ctx.methods.all(T, "c1")] == [
        (a.id, True), (b.id, False)]
    ms = await ctx.methods.detach(T, "c1", a.id)
    assert [(m.id, m.primary, m.active) for m in ms] == [(b.id, True, False)]
    with pytest.raises(NoPaymentMethod):
        await ctx.methods.require(T, "c1")
    ms = await ctx.methods.activate(T, "c1", b.id)  # the customer's act
    assert (await ctx.methods.require(T, "c1"))[1][0].id == b.id


async def test_refund_balance_closes_at_zero(ctx: BillingContext, localstripe: LocalStripe) -> None:
    await ctx.methods.attach(T, "c1", localstripe.card())
    a1 = await funding.fund(ctx, T, "c1", 100 * D, "f1")
    a2 = await funding.fund(ctx, T, "c1", 200 * D, "f2")
    await ctx.store.adjust(T, "c1", -250_005_000, "usage", op_id="usage:x")  # $250.005 used
    entries = await funding.refund_balance(ctx, T, "c1")
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.balance == 0 and state.closed
    ledger = await _ledger(ctx)
    refunds = [e for e in ledger if e["kind"] == "refund"]
    assert sum(int(e["delta"]) for e in refunds) == -49_990_000  # $49.99 back by card
    assert len(entries) == len(refunds) + 1  # + the sub-cent remainder write-off
    refunded = {e["payment_intent"] for e in refunds}
    assert refunded <= {a1.pi, a2.pi}
    # each booking is remembered as long as Stripe lists the refund, so a refund-balance
    # call months later (which re-reads them to recover a crashed run) books none twice
    for e in refunds:
        ttl = await ctx.store.redis.ttl(keys.op(T, f"refund:{e['stripe_refund']}"))
        assert ttl > 365 * 86_400
    # one refund_processed, written with the call's last step (the write-off here)
    [event] = await _events(ctx, "refund_processed")
    assert (event["account"], event["amount"], event["balance"]) == ("c1", "49990000", "0")
    assert [e["method"] for e in await _events(ctx, "funding_received")] == ["card", "card"]
    assert await funding.refund_balance(ctx, T, "c1") == []
    assert (await ctx.store.account(T, "c1")).balance == 0  # type: ignore[union-attr]
    assert len(await _events(ctx, "refund_processed")) == 1  # nothing refunded: no event
    # a closed account takes no new funding
    with pytest.raises(Exception) as err:
        await funding.fund(ctx, T, "c1", 100 * D, "f3")
    assert getattr(err.value, "code", "") == "account_closed"


async def test_refund_refused_when_charges_cannot_cover(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    await ctx.store.adjust(T, "c1", 50 * D, "adjustment", op_id="manual-credit")
    with pytest.raises(InvalidRequest) as err:
        await funding.refund_balance(ctx, T, "c1")
    assert err.value.code == "refund_exceeds_charges"
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.balance == 50 * D and not state.closed


async def test_refund_balance_after_a_crash_between_refund_and_ledger(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    """A run died right after Stripe refunded $60 and before the ledger entry: the next run
    books that refund and refunds only the rest, never the same money twice."""
    await ctx.methods.attach(T, "c1", localstripe.card())
    a = await funding.fund(ctx, T, "c1", 100 * D, "f1")
    await ctx.gateway.refund(  # what the dead run did, and nothing more
        payment_intent=a.pi, amount_cents=6_000, idempotency_key="crashed-run",
        metadata={"tenant": T, "account": "c1", "process": "balance_refund"})
    await funding.refund_balance(ctx, T, "c1")
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.balance == 0 and state.closed
    refunds = await ctx.gateway.list_refunds(a.pi)
    assert sum(cents for _, cents, _ in refunds) == 10_000  # $100 back in all, not $160
    ledger = [e for e in await _ledger(ctx) if e["kind"] == "refund"]
    assert sorted(int(e["delta"]) for e in ledger) == [-60 * D, -40 * D]
    assert any(e.get("recovered") == "1" for e in ledger)
    # what the client got back in all: the dead run's refund included (the $40 refund's
    # booking, this call's last step, carries it)
    [event] = await _events(ctx, "refund_processed")
    assert (event["amount"], event["balance"]) == (str(100 * D), "0")


async def test_a_refund_only_a_crashed_run_made_is_told_once(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    """The dead run refunded the whole balance and booked none of it: the next call only
    books it (no step of its own to carry the event), and still tells it, once."""
    await ctx.methods.attach(T, "c1", localstripe.card())
    a = await funding.fund(ctx, T, "c1", 100 * D, "f1")
    await ctx.gateway.refund(
        payment_intent=a.pi, amount_cents=10_000, idempotency_key="crashed-run",
        metadata={"tenant": T, "account": "c1", "process": "balance_refund"})
    assert await funding.refund_balance(ctx, T, "c1") == []  # nothing left to refund
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.balance == 0 and state.closed
    [event] = await _events(ctx, "refund_processed")
    assert (event["account"], event["amount"], event["balance"]) == ("c1", str(100 * D), "0")
    await funding.refund_balance(ctx, T, "c1")
    assert len(await _events(ctx, "refund_processed")) == 1


async def _manual_credit(ctx: BillingContext, amount: int, key: str) -> None:
    """What POST /v1/accounts/{id}/credits does (engine/api/accounts.py): no account lock."""
    res = await ctx.store.adjust(T, "c1", amount, "funding", op_id=f"credit:c1:{key}",
                                 extra={"process": "manual", "note": "", "reference": ""})
    assert res.ok


async def test_a_credit_landing_before_the_close_is_checked_with_it(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    """A manual credit lands after refund-balance read the card charges and before it
    closes: the check and the close are one step, so the $50 is counted, cannot be
    refunded by card, and the refund is refused with nothing moved (it was refunded $100
    of $150 and closed with $50 left)."""
    await ctx.methods.attach(T, "c1", localstripe.card())
    a = await funding.fund(ctx, T, "c1", 100 * D, "f1")

    async def credit_lands(step: str, account: str) -> None:
        if step == "before_close":
            await _manual_credit(ctx, 50 * D, "wire-1")

    ctx.refund_hook = credit_lands
    with pytest.raises(InvalidRequest) as err:
        await funding.refund_balance(ctx, T, "c1")
    assert err.value.code == "refund_exceeds_charges"
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.balance == 150 * D and not state.closed
    assert await ctx.gateway.list_refunds(a.pi) == []


async def test_a_credit_landing_after_the_close_is_not_written_off(
        ctx: BillingContext, localstripe: LocalStripe) -> None:
    """The refund returns the balance the close saw ($50.005: $50.00 by card, $0.005
    written off). A $0.004 credit landing while the refund runs stays on the closed
    account, in the ledger as what it is (it was written off as a usage remainder)."""
    await ctx.methods.attach(T, "c1", localstripe.card())
    a = await funding.fund(ctx, T, "c1", 100 * D, "f1")
    await ctx.store.adjust(T, "c1", -49_995_000, "usage", op_id="usage:x")

    async def credit_lands(step: str, account: str) -> None:
        if step == "before_refund":
            await _manual_credit(ctx, 4_000, "cheque-1")

    ctx.refund_hook = credit_lands
    await funding.refund_balance(ctx, T, "c1")
    state = await ctx.store.account(T, "c1")
    assert state is not None and state.closed and state.balance == 4_000
    assert [cents for _, cents, _ in await ctx.gateway.list_refunds(a.pi)] == [5_000]
    [off] = [e for e in await _ledger(ctx) if e["kind"] == "adjustment"]
    assert off["delta"] == "-5000" and off["reason"] == "sub-cent remainder"
