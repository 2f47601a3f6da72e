"""The wiring billing's functions share: config, store, Stripe gateway, archive."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from billing.attempts import Charger, Hook
from billing.methods import Methods
from billing.stripe_gateway import StripeGateway
from engine.core.billing_errors import UnknownAccount
from engine.core.config import Account, Config, Tenant
from engine.core.constants import WALLET
from engine.store.store import Store

if TYPE_CHECKING:
    from billing.archive import Archive
    from billing.leads import LeadArchive

RefundHook = Callable[[str, str], Awaitable[None]]  # (step, account)
# a recharge's outcome and, when it succeeded, its latency in seconds (engine.obs.telemetry)
RechargeObserver = Callable[[str, float | None], None]


@dataclass
class BillingContext:
    config: Config
    store: Store
    gateway: StripeGateway
    archive: Archive | None = None
    leads: LeadArchive | None = None  # the lead archive (billing.leads), for the portal
    hook: Hook | None = None  # test seam, see billing.attempts.Charger
    refund_hook: RefundHook | None = None  # test seam of funding.refund_balance's steps
    # a recharge's outcome (succeeded, declined, authentication_required, failed, skipped)
    # and, when it succeeded, its latency in seconds: the service wires it to the metrics
    observer: RechargeObserver | None = None
    methods: Methods = field(init=False)
    charger: Charger = field(init=False)

    def __post_init__(self) -> None:
        self.methods = Methods(self.store.redis, self.gateway)
        self.charger = Charger(self.store, self.gateway, hook=self.hook)

    def tenant(self, tenant_id: str) -> Tenant:
        for t in self.config.tenants:
            if t.id == tenant_id:
                return t
        raise UnknownAccount(f"unknown tenant {tenant_id}", code="unknown_tenant")

    def settings(self, tenant_id: str, account: str) -> Account:
        """The config of a tenant's account (the wallet or one of its clients)."""
        tenant = self.tenant(tenant_id)
        if account == WALLET:
            return tenant.wallet
        for c in self.config.clients:
            if c.id == account and c.tenant == tenant_id:
                return c
        raise UnknownAccount(f"unknown account {account}")

    def account_ids(self, tenant_id: str) -> list[str]:
        return [WALLET, *(c.id for c in self.config.clients if c.tenant == tenant_id)]
