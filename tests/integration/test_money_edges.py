"""Edge cases of the money paths found in review: reprices, idempotency scopes, cursors,
config bounds, API-set auto-recharge across reloads."""

from __future__ import annotations

import msgspec
import pytest

from engine.core import keys
from engine.core.config import AutoRecharge
from engine.core.errors import ConfigError
from engine.ingest.ingest import digest
from engine.run.provision import provision_accounts
from engine.store.store import Store
from tests.helpers import sales
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running


async def _spend(redis, b: str) -> tuple[int, int]:
    v = await redis.hmget(keys.buyer(sales.T, b), "sdv", "smv")
    return int(v[0] or 0), int(v[1] or 0)


async def test_reprice_never_crosses_the_floor_and_spend_caps_follow(redis):
    store = Store(redis)
    b = sales.buyer("b1", "http://127.0.0.1:9/")
    await sales.accounts(store, b)
    await sales.sell(store, b, "L1")  # $25 of $100
    res = await store.reprice_sale(sales.T, "L1", "b1", 200_000_000)  # would reach -$100
    assert res.ok and res.price == "25000000"  # refused above the floor: routed price stands
    assert await sales.balance(store, "c-b1") == 75_000_000
    await sales.sell(store, b, "L2")
    res = await store.reprice_sale(sales.T, "L2", "b1", 30_000_000)  # $5 more: fits
    assert res.price == "30000000" and await sales.balance(store, "c-b1") == 45_000_000
    assert await _spend(redis, "b1") == (55_000_000, 55_000_000)
    await store.refund_sale(sales.T, "L2", "b1", "rejected")
    await store.refund_sale(sales.T, "L1", "b1", "rejected")
    assert await _spend(redis, "b1") == (0, 0)  # never negative, never drifting
    assert await sales.balance(store, "c-b1") == 100_000_000


def test_idempotency_keys_of_suppliers_never_collide():
    assert digest("1", b"order-51") != digest("11", b"order-5")
    assert digest("s1", b"x") == digest("s1", b"x")


@pytest.mark.parametrize(("setting", "value"), [
    ("replay_window_s", 0), ("idempotency_ttl_s", 0), ("batch_inflight", 0),
])
def test_settings_bounds(setting, value):
    with pytest.raises(ConfigError, match=setting):
        make_config(base=BASE_TOML + f"\n[settings]\n{setting} = {value}\n")


def test_negative_fee_is_refused():
    with pytest.raises(ConfigError, match="negative"):
        make_config(base=BASE_TOML.replace('outbound_delivery = "0.20"',
                                           'outbound_delivery = "-0.10"'))


@pytest.mark.parametrize("caps", ['weekday = { sat = -5 }', 'spend_day = "-1.00"',
                                  'spend_month = "-0.01"'])
def test_negative_caps_are_refused_not_read_as_no_cap(caps: str) -> None:
    with pytest.raises(ConfigError, match="must not be negative"):
        make_config(campaign(), buyer("b1", extra=f"caps = {{ {caps} }}"))


def test_the_floor_is_at_most_20_dollars_below_zero():
    """Seed 000: "Max negative accrual is -$20.00"."""
    toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                             'id = "c1"\nopening_balance = "100.00"\nfloor = "-20.01"')
    assert toml != BASE_TOML
    with pytest.raises(ConfigError, match=r"floor.*-20\.00"):
        make_config(base=toml)
    make_config(base=toml.replace('"-20.01"', '"-20.00"'))


def test_a_recharge_amount_is_whole_cents():
    """A card is charged in cents: a config amount with sub-cent digits would credit more
    than it charged (the API path already refused it)."""
    ar = 'auto_recharge = { enabled = true, threshold = "20.00", amount = "100.009999" }'
    toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                             f'id = "c1"\nopening_balance = "100.00"\n{ar}')
    assert toml != BASE_TOML
    with pytest.raises(ConfigError, match=r"auto_recharge\.amount.*whole cents"):
        make_config(base=toml)


def test_two_tenants_cannot_share_an_api_token():
    """The bearer token names the tenant: a shared one would let t1 act as t2."""
    with pytest.raises(ConfigError, match=r"tenants\[1\]\.api_token.*same token as tenant 't1'"):
        make_config(base=BASE_TOML.replace('api_token = "tok-t2"', 'api_token = "tok-t1"'))


async def test_credit_idempotency_is_per_account(redis, redis_server):
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        h = {"Idempotency-Key": "wire-1"}
        s1, _ = await eng.api("POST", "/v1/accounts/c1/credits", json={"amount": "5.00"}, headers=h)
        s2, b = await eng.api("POST", "/v1/accounts/c2/credits", json={"amount": "5.00"}, headers=h)
        assert (s1, s2) == (201, 201) and not b["replay"]
        assert await eng.balance("c1") == await eng.balance("c2") == 105_000_000


@pytest.mark.parametrize("cursor", ["123-", "-5", "1" * 23, "99999999999999999999-1", "a-b"])
async def test_bad_ledger_cursor_is_a_400(redis, redis_server, cursor):
    cfg = make_config(campaign(), buyer("b1"))
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.api("GET", f"/v1/accounts/c1/ledger?before={cursor}")
        assert status == 400 and body["error"]["code"] == "invalid_cursor"


async def test_api_auto_recharge_survives_a_reload(redis):
    store = Store(redis)
    cfg = make_config(campaign(), buyer("b1"))
    await provision_accounts(cfg, store)
    state = await store.account("t1", "c1")
    assert state is not None and not state.auto_recharge
    on = AutoRecharge(enabled=True, threshold="30.00", amount="100.00")
    await redis.set(keys.autorecharge("t1", "c1"), msgspec.json.encode(on))  # as PUT stores it
    await provision_accounts(cfg, store)  # a reload or a restart
    state = await store.account("t1", "c1")
    assert state is not None and state.auto_recharge and state.recharge_threshold == 30_000_000


async def test_every_money_script_survives_script_flush(redis):
    """NOSCRIPT after SCRIPT FLUSH: each script is sent again and runs (engine/store/scripts.py)."""
    store = Store(redis)
    await store.load_scripts()
    b = sales.buyer("b1", "http://127.0.0.1:9/")
    await redis.script_flush()
    await sales.accounts(store, b)  # account_settings.lua
    await redis.script_flush()
    await sales.sell(store, b, "L1")  # decide.lua
    await redis.script_flush()
    assert (await store.reprice_sale(sales.T, "L1", "b1", 20_000_000)).ok  # refund.lua
    await redis.script_flush()
    assert (await store.refund_sale(sales.T, "L1", "b1", "rejected")).ok
    await redis.script_flush()
    assert (await store.adjust(sales.T, "c-b1", 1_000_000, "adjustment")).ok  # adjust.lua
    assert await sales.balance(store, "c-b1") == 101_000_000


@pytest.mark.parametrize("name", ["delivery_precheck", "delivery_finish", "sync_claim",
                                  "sync_final", "delivery_requeue"])
async def test_bookkeeping_scripts_load_and_survive_script_flush(redis, name):
    from engine.store.scripts import scripts

    script = scripts().by_name[name]
    await script.load(redis)
    await redis.script_flush()  # the registry sends the source again on NOSCRIPT
    args = {
        "delivery_precheck": ([keys.tenant_prefix("t1")], [b'[["L1","b1"]]']),
        "delivery_finish": ([keys.tenant_prefix("t1")],
                            [b'{"g":"g","ttl":60,"lmax":5,"m":10,"j":[],"a":[]}']),
        "sync_claim": ([keys.tenant_prefix("t1")], ["L1", "k1", "{}", 60, "", "b1"]),
        "sync_final": ([keys.tenant_prefix("t1")],
                       [b'{"k":"k1","r":"","kt":60,"lead":"L1","rel":[],"del":[],"fp":[]}']),
        "delivery_requeue": ([keys.retries("t1"), keys.deliveries("t1")], [0, 10]),
    }[name]
    result = await script(redis, args[0], args[1])
    assert result is not None
