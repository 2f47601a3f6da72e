"""A seeded property test: random sequences of leads, credits, pauses and reloads.

After every sequence: each account's ledger sums to its balance, no balance is below its
floor, and the balance_alert events of an account are exactly its downward crossings of
the alert threshold as read back from its own ledger; its balance_negative events, its
crossings of zero; its funding_received events, its funding credits.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import SEED
from tests.helpers.harness import buyer, campaign, make_config, running

ALERT = 20_000_000


def _config(price_b1: str, price_b2: str):
    return make_config(
        campaign(distribution="round_robin"),
        buyer("b1", price=price_b1, extra="caps = { hour = 40 }"),
        buyer("b2", client="c2", price=price_b2),
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("lead"), st.integers(0, 30)),
        st.tuples(st.just("credit"), st.sampled_from(["c1", "c2"]), st.integers(1, 80)),
        st.tuples(st.just("pause"), st.sampled_from(["b1", "b2"]), st.booleans()),
        st.tuples(st.just("reload"), st.sampled_from(["7.00", "13.50", "31.00"]),
                  st.sampled_from(["4.25", "19.99"])),
    ),
    min_size=5, max_size=60,
)


async def _check(eng) -> None:
    await eng.assert_reconciled()
    events = await eng.events()
    for account in ("c1", "c2", "wallet"):
        rows = reversed(await eng.store.ledger_page("t1", account, limit=10**9))
        crossings = negative = funded = 0
        for _, f in rows:
            after, delta = int(f["balance"]), int(f["delta"])
            funded += f["kind"] == "funding" and delta > 0
            if delta < 0 and after - delta >= ALERT > after:
                crossings += 1
            if delta < 0 and after - delta >= 0 > after:
                negative += 1
        alerts = sum(1 for e in events if e["type"] == "balance_alert" and e["account"] == account)
        assert alerts == crossings, account
        below = sum(1 for e in events
                    if e["type"] == "balance_negative" and e["account"] == account)
        assert below == negative, account
        received = sum(1 for e in events
                       if e["type"] == "funding_received" and e["account"] == account)
        assert received == funded, account


async def _run(url: str, steps) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()  # our own test server
    await client.aclose()
    async with running(_config("7.00", "4.25"), url) as eng:
        n = 0
        for step in steps:
            if step[0] == "lead":
                for _ in range(step[1]):
                    n += 1  # distinct payloads: no 60-second replay
                    await eng.lead(email=f"u{n}@example.com")
            elif step[0] == "credit":
                n += 1
                await eng.api("POST", f"/v1/accounts/{step[1]}/credits",
                              json={"amount": f"{step[2]}.00"},
                              headers={"Idempotency-Key": f"credit-{n}"})
            elif step[0] == "pause":
                await eng.api("POST", f"/v1/buyers/{step[1]}/{'pause' if step[2] else 'resume'}")
            else:
                eng.app.runtime = type(eng.app.runtime)(_config(step[1], step[2]))
        await _check(eng)


@seed(SEED)
@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=ops)
def test_random_sequences_keep_the_books(redis_server, steps) -> None:
    asyncio.run(_run(redis_server.url, steps))
