"""A config reload or restart applies the new account settings to the account's state
(account_settings.lua): pause and resume for the minimum balance and the floor, and the
balance_alert / recharge_needed events of a threshold that now lies above the balance,
each once per crossing, as decide.lua does for a debit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from billing import recharge
from billing.stripe_gateway import StripeGateway
from engine.core import keys
from engine.core.config import AutoRecharge
from engine.run.provision import provision_accounts
from engine.store.store import AccountState, Store
from tests.helpers.billing_fixtures import T as billing_T
from tests.helpers.billing_fixtures import make_config as billing_config
from tests.helpers.billing_fixtures import new_ctx
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running
from tests.helpers.stripe_fixture import LocalStripe

T = "acme"
M = 1_000_000  # $1.00


async def _apply(store: Store, account: str = "c1", **kw: Any) -> AccountState:
    args: dict[str, Any] = dict(opening=100 * M, floor=-20 * M, alert=0, recharge_threshold=0,
                                auto_recharge=False, min_balance=None, mode="manual")
    args.update(kw)
    await store.apply_account_settings(T, account, **args)
    state = await store.account(T, account)
    assert state is not None
    return state


async def _spend(store: Store, amount: int, account: str = "c1") -> None:
    res = await store.adjust(T, account, -amount, "usage")
    assert res.ok, res


async def _events(redis: aioredis.Redis, tenant: str = T) -> list[dict[str, str]]:
    rows: Any = await redis.xrange(keys.events(tenant))  # redis-py's loose stream types
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]


async def _types(redis: aioredis.Redis) -> list[str]:
    return [e["type"] for e in await _events(redis)]


# -- minimum balance ---------------------------------------------------------------------------

async def test_a_minimum_added_above_the_balance_pauses_once(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=20 * M)
    state = await _apply(store, opening=20 * M, min_balance=50 * M)  # the reload
    assert state.paused == "min_balance" and state.balance == 20 * M
    [e] = await _events(redis)
    assert (e["type"], e["account"], e["reason"], e["ref"], e["balance"]) == (
        "buyer_paused", "c1", "min_balance", "config", str(20 * M))
    await _apply(store, opening=20 * M, min_balance=50 * M)  # a restart: nothing new
    await _apply(store, opening=20 * M, min_balance=40 * M)  # still below the lower minimum
    assert await _types(redis) == ["buyer_paused"]
    assert (await _apply(store, opening=20 * M, min_balance=40 * M)).paused == "min_balance"


async def test_a_minimum_removed_or_lowered_resumes(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=60 * M, min_balance=50 * M)
    await _spend(store, 20 * M)  # 40 < 50: paused by the crossing (adjust.lua)
    assert (await store.account(T, "c1")).paused == "min_balance"  # type: ignore[union-attr]
    state = await _apply(store, opening=60 * M)  # the minimum removed
    assert state.paused == ""
    assert await _types(redis) == ["buyer_paused", "buyer_resumed"]
    await _apply(store, opening=60 * M)
    assert await _types(redis) == ["buyer_paused", "buyer_resumed"]
    # lowered below the balance instead of removed: the same
    await _apply(store, opening=60 * M, min_balance=50 * M)
    assert (await store.account(T, "c1")).paused == "min_balance"  # type: ignore[union-attr]
    assert (await _apply(store, opening=60 * M, min_balance=30 * M)).paused == ""
    assert await _types(redis) == ["buyer_paused", "buyer_resumed"] * 2


async def test_auto_recharge_turned_on_lifts_a_minimum_pause_and_asks_for_money(
        redis: aioredis.Redis) -> None:
    """With auto-recharge a client below its minimum is recharged, not paused (seed 001)."""
    store = Store(redis)
    await _apply(store, opening=60 * M, min_balance=50 * M)
    await _spend(store, 20 * M)
    state = await _apply(store, opening=60 * M, min_balance=50 * M, auto_recharge=True,
                         recharge_threshold=50 * M)
    assert state.paused == "" and state.auto_recharge
    events = await _events(redis)
    assert [e["type"] for e in events] == ["buyer_paused", "recharge_needed", "buyer_resumed"]
    assert events[1]["threshold"] == str(50 * M) and events[1]["ref"] == "config"


# -- auto-recharge threshold, balance alert -----------------------------------------------------

async def test_auto_recharge_enabled_below_its_threshold_asks_once_per_crossing(
        redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=25 * M)

    async def ar(threshold: int, on: bool = True) -> None:
        await _apply(store, opening=25 * M, auto_recharge=on, recharge_threshold=threshold)

    await ar(50 * M)
    [e] = await _events(redis)
    assert (e["type"], e["account"], e["threshold"], e["balance"]) == (
        "recharge_needed", "c1", str(50 * M), str(25 * M))
    await ar(50 * M)  # a restart
    await ar(60 * M)  # still below: already asked
    assert await _types(redis) == ["recharge_needed"]
    await ar(20 * M)  # now above the balance: re-armed, as a credit above it would
    await ar(50 * M)
    assert await _types(redis) == ["recharge_needed"] * 2
    await ar(0, on=False)
    await ar(50 * M)  # off, then on again below it
    assert await _types(redis) == ["recharge_needed"] * 3
    # spending further below the threshold is no new crossing (decide.lua's rule)
    await _spend(store, 5 * M)
    assert await _types(redis) == ["recharge_needed"] * 3


async def test_an_alert_raised_above_the_balance_fires_once(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=25 * M, alert=20 * M)
    await _apply(store, opening=25 * M, alert=30 * M)
    [e] = await _events(redis)
    assert (e["type"], e["threshold"], e["balance"]) == ("balance_alert", str(30 * M), str(25 * M))
    await _apply(store, opening=25 * M, alert=40 * M)  # already below (and told)
    await _spend(store, 1 * M)  # no downward crossing either
    assert await _types(redis) == ["balance_alert"]
    await _apply(store, opening=25 * M, alert=0)  # off
    await _apply(store, opening=25 * M, alert=30 * M)  # on again, above the balance
    assert await _types(redis) == ["balance_alert"] * 2


async def test_an_own_alert_fires_once_and_outlives_reloads(redis: aioredis.Redis) -> None:
    """alert_set.lua (PUT /alert): an own threshold above the balance fires balance_alert
    (ref api) once, as a reload's would; a reload keeps it over the config's (which a null
    puts back in force, applied to the balance the same way); an unknown account: nothing."""
    store = Store(redis)
    await _apply(store, opening=25 * M, alert=20 * M)
    assert await store.set_alert(T, "c1", 22 * M, 20 * M, ref="api")  # below the balance
    assert await _types(redis) == []
    assert await store.set_alert(T, "c1", 30 * M, 20 * M, ref="api")  # above: told once
    [e] = await _events(redis)
    assert (e["type"], e["threshold"], e["balance"], e["ref"]) == (
        "balance_alert", str(30 * M), str(25 * M), "api")
    assert await store.set_alert(T, "c1", 40 * M, 20 * M, ref="api")  # already below
    state = await _apply(store, opening=25 * M, alert=10 * M)  # a reload: the own one stays
    assert (state.alert, state.own_alert) == (40 * M, True)
    assert await _types(redis) == ["balance_alert"]
    await _spend(store, 20 * M)  # 5 < 40, no new crossing
    await store.adjust(T, "c1", 50 * M, "funding")  # 55: above the own threshold again
    await _spend(store, 20 * M)  # 35 < 40: the debit's crossing, of the own threshold
    alerts = [e for e in await _events(redis) if e["type"] == "balance_alert"]
    assert [(e["threshold"], e["balance"]) for e in alerts][1:] == [(str(40 * M), str(35 * M))]
    # back to the config's (10, below the balance): nothing fires; the reload applies it
    assert await store.set_alert(T, "c1", None, 10 * M, ref="api")
    state = await _apply(store, opening=25 * M, alert=36 * M)  # a reload raises it: told
    assert (state.alert, state.own_alert) == (36 * M, False)
    assert [e.get("ref", "") for e in await _events(redis) if e["type"] == "balance_alert"
            ] == ["api", "", "config"]
    assert not await store.set_alert(T, "nope", 30 * M, 20 * M, ref="api")
    assert await redis.exists(keys.acct(T, "nope")) == 0


async def test_an_own_alert_of_billing_none_or_a_closed_account_is_silent(
        redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, "c1", opening=10 * M, mode="none")
    await _apply(store, "c2", opening=10 * M)
    await redis.hset(keys.acct(T, "c2"), "closed", "1")
    for account in ("c1", "c2"):
        assert await store.set_alert(T, account, 30 * M, 0, ref="api")
        assert (await store.account(T, account)).alert == 30 * M  # type: ignore[union-attr]
    assert await _types(redis) == []


# -- floor ------------------------------------------------------------------------------------

async def test_a_floor_raised_above_the_balance_pauses_until_a_credit(
        redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=0)
    await _spend(store, 20 * M)  # -20.00, at the default floor
    state = await _apply(store, opening=0, floor=0)
    assert state.paused == "floor" and state.floor == 0
    negative, e = await _events(redis)
    assert negative["type"] == "balance_negative"  # the spend, crossing 0.00
    assert (e["type"], e["reason"], e["ref"]) == ("buyer_paused", "floor", "config")
    # the floor lowered back: a floor pause still waits for a credit to 0.00, as ever
    assert (await _apply(store, opening=0)).paused == "floor"
    await store.adjust(T, "c1", 20 * M, "adjustment")
    assert (await store.account(T, "c1")).paused == ""  # type: ignore[union-attr]
    assert await _types(redis) == ["balance_negative", "buyer_paused", "buyer_resumed"]


# -- what a reload never does -----------------------------------------------------------------

async def test_a_pause_for_another_reason_is_never_lifted(redis: aioredis.Redis) -> None:
    store = Store(redis)
    # by the floor: decide.lua pauses an account that cannot pay a lead, at any balance
    await _apply(store, "c1", opening=10 * M, min_balance=5 * M)
    await store.set_account_flag(T, "c1", "paused", "floor")
    # any other reason (none is set by the engine today; a future or manual one)
    await _apply(store, "c2", opening=10 * M)
    await store.set_account_flag(T, "c2", "paused", "manual")
    # by the minimum, still below the new (lower) one
    await _apply(store, "c3", opening=10 * M, min_balance=50 * M)
    for _ in range(2):
        assert (await _apply(store, "c1", opening=10 * M, alert=5 * M)).paused == "floor"
        assert (await _apply(store, "c2", opening=10 * M, floor=0)).paused == "manual"
        assert (await _apply(store, "c3", opening=10 * M, min_balance=20 * M)).paused == (
            "min_balance")
    assert await _types(redis) == ["buyer_paused"]  # c3's, when it was created below 50


async def test_a_closed_account_is_left_alone(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=10 * M)
    await store.set_account_flag(T, "c1", "closed", "1")
    state = await _apply(store, opening=10 * M, min_balance=50 * M, alert=20 * M, floor=0,
                         auto_recharge=True, recharge_threshold=20 * M)
    assert state.paused == "" and await _types(redis) == []


async def test_billing_none_is_never_paused(redis: aioredis.Redis) -> None:
    store = Store(redis)
    await _apply(store, opening=60 * M, min_balance=50 * M)
    await _spend(store, 20 * M)
    state = await _apply(store, opening=60 * M, min_balance=50 * M, mode="none")
    assert state.paused == ""  # switched to "none": resumed
    await _apply(store, opening=60 * M, min_balance=55 * M, floor=0, alert=50 * M, mode="none")
    assert await _types(redis) == ["buyer_paused", "buyer_resumed"]


async def test_a_new_account_below_its_minimum_starts_paused(redis: aioredis.Redis) -> None:
    """The opening balance is where a new account starts: below its minimum (no auto-
    recharge) it is paused at once (it was left active and bought down to its floor). A new
    account below its alert or recharge threshold gets no event: its balance crossed
    nothing (a recharge is asked for when a card is added, billing.recharge_if_below)."""
    store = Store(redis)
    assert (await _apply(store, "c1", opening=10 * M, min_balance=50 * M)).paused == "min_balance"
    await _apply(store, "c2", opening=10 * M, alert=20 * M, auto_recharge=True,
                 recharge_threshold=20 * M)
    assert [(e["type"], e["account"]) for e in await _events(redis)] == [
        ("buyer_paused", "c1")]


# -- through the engine: `leadflow config load` / SIGHUP ----------------------------------------

async def test_a_reload_pauses_and_resumes_buyers(redis: aioredis.Redis, redis_server: Any,
                                                   tmp_path: Path) -> None:
    """The review's repro: a minimum added below the balance let the buyer buy on; removed,
    the buyer stayed paused (REJECTED 202, "1 without funds")."""
    c1 = 'id = "c1"\nopening_balance = "100.00"'
    parts = (campaign(), buyer("b1"))

    def config(extra: str) -> str:
        return BASE_TOML.replace(c1, c1 + "\n" + extra) + "\n".join(parts)

    f = tmp_path / "leadflow.toml"
    async with running(make_config(*parts), redis_server.url) as eng:
        for i in range(8):
            _, r = await eng.lead(email=f"u{i}@example.com")
            assert r["status"] == "ACCEPTED"
        assert await eng.balance("c1") == 20 * M
        f.write_text(config('min_balance = "50.00"'))
        await eng.svc.reload(str(f))
        _, r = await eng.lead(email="after-min@example.com")
        assert (r["status"], r["code"]) == ("REJECTED", 202), r
        assert await eng.balance("c1") == 20 * M
        f.write_text(config(""))
        await eng.svc.reload(str(f))
        _, r = await eng.lead(email="after-removal@example.com")
        assert r["status"] == "ACCEPTED", r
        events = [(e["type"], e.get("reason", "")) for e in await eng.events()
                  if e["account"] == "c1"]
        assert events == [("buyer_paused", "min_balance"), ("buyer_resumed", ""),
                          ("balance_alert", "")]  # that last lead: 20.00 -> 10.00
        await eng.assert_reconciled()


async def test_the_recharge_worker_acts_on_a_reload_that_turns_auto_recharge_on(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe) -> None:
    """The review's repro: auto-recharge enabled by a reload while the balance is already
    below its threshold; no recharge_needed came, so none was ever charged."""
    ctx = await new_ctx(redis, gateway, billing_config(auto=AutoRecharge()))
    await ctx.methods.attach(billing_T, "c1", localstripe.card())
    await ctx.store.adjust(billing_T, "c1", 5 * M, "adjustment")  # $5.00, auto-recharge off
    on = billing_config(auto=AutoRecharge(enabled=True, threshold="20.00", amount="100.00"))
    await provision_accounts(on, ctx.store)  # what Service.reload runs, then it swaps the config
    ctx.config = on
    assert await recharge.process_once(on, ctx.store, gateway, consumer="w1", ctx=ctx) >= 1
    state = await ctx.store.account(billing_T, "c1")
    assert state is not None and state.balance == 105 * M
    events = [(e["account"], e["type"], e.get("reason", ""))
              for e in await _events(redis, billing_T)]
    c1 = [t for a, t, _ in events if a == "c1"]
    assert c1.count("recharge_needed") == 1 and c1.count("recharge_succeeded") == 1
    # c2 and c3 (0.00, no card) were asked for too, and say why nothing was charged
    for other in ("c2", "c3"):
        assert [(t, r) for a, t, r in events if a == other] == [
            ("recharge_needed", ""), ("recharge_failed", "no_payment_method")]
    await provision_accounts(on, ctx.store)  # a restart: c1 is above it now, c2/c3 still below
    await recharge.process_once(on, ctx.store, gateway, consumer="w1", ctx=ctx)
    needed = [e for e in await _events(redis, billing_T) if e["type"] == "recharge_needed"]
    assert len(needed) == 3  # no new crossing, no new ask
    state = await ctx.store.account(billing_T, "c1")
    assert state is not None and state.balance == 105 * M


async def test_events_of_a_reload_are_counted_in_the_metrics(
        redis: aioredis.Redis, redis_server: Any, tmp_path: Path) -> None:
    """leadflow_events_emitted_total / leadflow_buyers_paused_total count account_settings.lua's
    events as they count decide.lua's and adjust.lua's."""
    from engine.obs.metrics import METRICS

    def count(metric: Any) -> float:
        return metric._value.get()  # type: ignore[no-any-return]

    c1 = 'id = "c1"\nopening_balance = "100.00"'
    f = tmp_path / "leadflow.toml"
    async with running(make_config(campaign(), buyer("b1")), redis_server.url) as eng:
        paused, alerts = (count(METRICS.buyers_paused("min_balance")),
                          count(METRICS.events_emitted("balance_alert")))
        f.write_text(BASE_TOML.replace(c1, c1 + '\nmin_balance = "150.00"\nalert = "120.00"')
                     + campaign() + buyer("b1"))
        await eng.svc.reload(str(f))
        assert (await eng.store.account("t1", "c1")).paused == "min_balance"  # type: ignore[union-attr]
        assert count(METRICS.buyers_paused("min_balance")) == paused + 1
        assert count(METRICS.events_emitted("balance_alert")) == alerts + 1
        await eng.svc.reload(str(f))  # nothing new: nothing counted
        assert count(METRICS.buyers_paused("min_balance")) == paused + 1
