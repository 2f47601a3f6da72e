"""Make sales the way production does: sync the accounts, then run decide.lua."""

from __future__ import annotations

from typing import Any

import msgspec

from engine.core import keys, money
from engine.core.config import Buyer, Delivery
from engine.core.constants import WALLET
from engine.store.lua_protocol import Call, Candidate, LeadCall, decode_reply
from engine.store.scripts import scripts
from engine.store.store import Store, now_ms

T = "acme"
OPENING = 100_000_000  # $100.00
FEE = 500_000  # $0.50 outbound fee


def buyer(bid: str, url: str, *, price: str = "25.00", tenant: str = T,
          **delivery: Any) -> Buyer:
    return Buyer(id=bid, tenant=tenant, campaign="cmp", client=f"c-{bid}", price=price,
                 delivery=Delivery(url=url, **delivery))


async def accounts(store: Store, *buyers: Buyer) -> None:
    """The buyers' client accounts and the platform wallet of each of their tenants."""
    owned = {(b.tenant, WALLET) for b in buyers} | {(b.tenant, b.client) for b in buyers}
    for tenant, account in sorted(owned or {(T, WALLET)}):
        await store.apply_account_settings(tenant, account, opening=OPENING,
                                           floor=-20_000_000, alert=0, recharge_threshold=0,
                                           auto_recharge=False, min_balance=None, mode="manual")


async def sell(store: Store, b: Buyer, lead_id: str, lead: dict[str, str] | None = None, *,
               key: str | None = None, supplier: str = "") -> None:
    """One lead, one candidate: the sale record and the delivery job, as in production.
    ``key``: the call's idempotency key and fingerprint (another to sell the same lead
    again, to another buyer: a shared lead)."""
    key = key or lead_id
    lead = lead if lead is not None else {"first_name": "Ada", "email": "ada@example.com",
                                          "state": "CA"}
    batch = Call(now=now_ms(), wallet=WALLET, leads=[LeadCall(
        id=lead_id, key=f"k-{key}", key_ttl=3600, test=0, campaign=b.campaign, fee_in=0,
        sell_limit=1, round_robin=0, rotation=[], dedupe=[], dedupe_ttl=86_400,
        windows=["h1", "d1", "w1", "m1"], payload=msgspec.json.encode(lead).decode(),
        candidates=[Candidate(buyer=b.id, account=b.client, price=money.parse(b.price),
                              fee_out=FEE, caps=(-1,) * 7, dedupe=[f"fp-{key}"])],
        supplier=supplier,
    )])
    raw = await scripts().decide(store.redis, [keys.tenant_prefix(b.tenant)],
                                 [msgspec.json.encode(batch)])
    decisions = decode_reply(raw).decisions
    assert isinstance(decisions, list) and decisions[0].status == "ACCEPTED", decisions


async def balance(store: Store, account: str, *, tenant: str = T) -> int:
    state = await store.account(tenant, account)
    assert state is not None
    total, _ = await store.ledger_sum(tenant, account)
    assert total == state.balance, "the ledger must sum to the balance"
    return state.balance
