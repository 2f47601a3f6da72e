"""engine.notify.prefs and engine.notify.overrides against the tests' real redis-server:
categories, per-address preferences, unsubscribe tokens, template overrides."""

from __future__ import annotations

import base64

import pytest
import redis.asyncio as aioredis

from engine.core import keys
from engine.notify import NotifyError, overrides, prefs
from engine.notify import templates as t

ADDR = "AP@Bright.example"


def test_every_kind_has_one_category() -> None:
    kinds = [k for ks in prefs.CATEGORIES.values() for k in ks]
    assert sorted(kinds) == sorted(t.KINDS)
    assert set(prefs.CATEGORIES) > prefs.OPTIONAL
    assert {"balance", "account", "recharge", "funding"}.isdisjoint(prefs.OPTIONAL)


async def test_preferences_are_on_until_turned_off_per_address_and_tenant(
        redis: aioredis.Redis) -> None:
    assert await prefs.preferences(redis, "t1", ADDR) == dict.fromkeys(prefs.CATEGORIES, True)
    got = await prefs.set_preferences(redis, "t1", ADDR, {"reports": False, "balance": False})
    assert got == {**dict.fromkeys(prefs.CATEGORIES, True), "reports": False, "balance": False}
    # the same address in another case, with spaces: the same preferences
    assert await prefs.preferences(redis, "t1", " ap@bright.EXAMPLE ") == got
    assert not await prefs.wanted(redis, "t1", "ap@bright.example", "weekly_report")
    assert not await prefs.wanted(redis, "t1", ADDR, "balance_negative")
    assert await prefs.wanted(redis, "t1", ADDR, "cap_reached")
    # another tenant, another address: untouched
    assert await prefs.wanted(redis, "t2", ADDR, "weekly_report")
    assert await prefs.wanted(redis, "t1", "cfo@bright.example", "weekly_report")
    back = await prefs.set_preferences(redis, "t1", ADDR, {"reports": True})
    assert back["reports"] is True and back["balance"] is False
    # no address in any key
    assert all(b"bright" not in k.lower() for k in await redis.keys("*"))


async def test_an_unknown_category_stores_nothing(redis: aioredis.Redis) -> None:
    with pytest.raises(prefs.UnknownCategory):
        await prefs.set_preferences(redis, "t1", ADDR, {"reports": False, "nope": False})
    assert await redis.keys("*") == []


async def test_the_secret_is_made_once(redis: aioredis.Redis) -> None:
    assert await prefs.secret(redis, "t1", create=False) is None
    first = await prefs.secret(redis, "t1", create=True)
    assert first is not None and len(first) == 64
    assert await prefs.secret(redis, "t1", create=True) == first
    assert await prefs.secret(redis, "t1", create=False) == first
    assert await prefs.secret(redis, "t2", create=True) != first


async def test_a_token_turns_off_its_category_of_its_address_only(
        redis: aioredis.Redis) -> None:
    key = await prefs.secret(redis, "t1", create=True)
    assert key is not None
    tok = prefs.token(key, "t1", ADDR, "reports")
    assert "bright" not in base64.urlsafe_b64decode(tok.split(".")[0] + "==").decode()
    found = await prefs.verify(redis, tok, {"t1", "t2"})
    assert found == prefs.Unsubscribe("t1", "reports", prefs.address_id(ADDR))
    await prefs.unsubscribe(redis, found)
    await prefs.unsubscribe(redis, found)  # again: the same
    assert not await prefs.wanted(redis, "t1", ADDR, "weekly_report")
    assert await prefs.wanted(redis, "t1", ADDR, "cap_reached")
    url = prefs.unsubscribe_url("https://leads.acme.example/", tok)
    assert url == f"https://leads.acme.example/v1/notify/unsubscribe?t={tok}"


def _swap_payload(tok: str, payload: str) -> str:
    head = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    return f"{head}.{tok.split('.')[1]}"


async def test_forged_and_malformed_tokens_are_refused(redis: aioredis.Redis) -> None:
    key = await prefs.secret(redis, "t1", create=True)
    assert key is not None
    await prefs.secret(redis, "t2", create=True)
    tok = prefs.token(key, "t1", ADDR, "reports")
    addr = prefs.address_id(ADDR)
    other = prefs.address_id("cfo@bright.example")
    forged = [
        "", "x", "a.b.c", tok + "x", tok[:-2], "." + tok.split(".")[1], tok.split(".")[0] + ".",
        tok.replace(".", "!"), "é" + tok, tok + "=" * 600,
        _swap_payload(tok, f"t1\ncaps\n{addr}"),  # another category
        _swap_payload(tok, f"t1\nreports\n{other}"),  # another address
        _swap_payload(tok, f"t2\nreports\n{addr}"),  # another tenant's
        _swap_payload(tok, f"t1\nreports\n{addr}\nx"),
        _swap_payload(tok, f"t1\nnope\n{addr}"),
        prefs.token(b"not-the-secret", "t1", ADDR, "reports"),
    ]
    for bad in forged:
        assert await prefs.verify(redis, bad, {"t1", "t2"}) is None, bad
    # a tenant no longer configured, or whose secret was deleted
    assert await prefs.verify(redis, tok, {"t2"}) is None
    await redis.delete(keys.notify_secret("t1"))
    assert await prefs.verify(redis, tok, {"t1"}) is None
    assert await redis.exists(keys.notify_prefs("t1", addr)) == 0


async def test_overrides_get_put_delete_per_tenant(redis: aioredis.Redis) -> None:
    mine = t.Templates("Hi {{ client_name }}", "text", "<p>html</p>")
    assert await overrides.get(redis, "t1", "weekly_report") is None
    assert await overrides.overridden(redis, "t1") == set()
    await overrides.put(redis, "t1", "weekly_report", mine)
    assert await overrides.get(redis, "t1", "weekly_report") == mine
    assert await overrides.get(redis, "t2", "weekly_report") is None
    assert await overrides.overridden(redis, "t1") == {"weekly_report"}
    assert await overrides.delete(redis, "t1", "weekly_report")
    assert not await overrides.delete(redis, "t1", "weekly_report")
    assert await overrides.get(redis, "t1", "weekly_report") is None
    with pytest.raises(NotifyError):
        await overrides.put(redis, "t1", "nope", mine)
    # a value not written by put() counts as none
    await redis.hset(keys.notify_templates("t1"), "cap_reached", b"{not json")
    assert await overrides.get(redis, "t1", "cap_reached") is None
