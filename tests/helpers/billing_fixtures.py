"""Billing fixtures: a tenant config, a BillingContext on the real redis + localstripe."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from billing.attempts import Hook
from billing.context import BillingContext
from billing.stripe_gateway import StripeGateway
from engine.core import money
from engine.core.config import Account, AutoRecharge, Client, Config, Fees, Tenant
from engine.obs import telemetry
from engine.store.store import Store

T = "acme"


def make_config(*, fee: str = "3", auto: AutoRecharge | None = None,
                min_balance: str | None = None) -> Config:
    ar = auto or AutoRecharge()
    return Config(
        tenants=[Tenant(id=T, api_token="tok", timezone="UTC",
                        fees=Fees(card_fee_percent=fee),
                        wallet=Account(opening_balance="0.00"),
                        meters={"sms": "0.05", "email_test": "1.25", "transcribe": "0.012"})],
        clients=[Client(id=f"c{i}", tenant=T, billing="realtime", opening_balance="0.00",
                        auto_recharge=ar, min_balance=min_balance) for i in range(1, 4)],
    )


async def provision(ctx: BillingContext) -> None:
    """What the integrator does at start: every configured account into Redis."""
    for tenant in ctx.config.tenants:
        for account in ctx.account_ids(tenant.id):
            s = ctx.settings(tenant.id, account)
            ar = s.auto_recharge
            threshold_mode = ar.enabled and ar.every_days is None
            await ctx.store.apply_account_settings(
                tenant.id, account, opening=money.parse(s.opening_balance),
                floor=money.parse(s.floor), alert=money.parse(s.alert),
                recharge_threshold=money.parse(ar.threshold) if threshold_mode else 0,
                auto_recharge=threshold_mode,
                min_balance=money.parse(s.min_balance) if s.min_balance else None,
                mode=getattr(s, "billing", "manual"),
            )


async def new_ctx(redis: aioredis.Redis, gateway: StripeGateway, cfg: Config | None = None,
                  hook: Hook | None = None) -> BillingContext:
    # wired to the metrics as the service wires it
    store = Store(redis, events_observer=telemetry.events_observer)
    ctx = BillingContext(cfg or make_config(), store, gateway, hook=hook,
                         observer=telemetry.recharge_observer)
    await provision(ctx)
    return ctx


@pytest.fixture
async def ctx(redis: aioredis.Redis, gateway: StripeGateway) -> AsyncIterator[BillingContext]:
    yield await new_ctx(redis, gateway)
