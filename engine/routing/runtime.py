"""The compiled, immutable view of a config that request handlers read.

A reload builds a new Runtime completely and then swaps one reference, so a request sees
either the old config or the new one, never half of each; the money itself is decided in
Lua against Redis state, which a reload never rewrites (only account settings).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from billing.policy import effective, threshold_flags
from engine.core import money
from engine.core.config import Account, Client, Config, Tenant, resolve_secret
from engine.core.constants import WALLET
from engine.routing.plans import CampaignPlan
from engine.store.store import Store


@dataclass(frozen=True, slots=True)
class SupplierPlan:
    id: str
    tenant: str
    key: bytes = field(repr=False)  # the supplier's lp_key: never in a repr
    payout: str  # decimal string, echoed to the seller on ACCEPTED
    test_mode: bool
    campaigns: frozenset[str]  # empty = every campaign of the tenant


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Runtime:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tenants: dict[str, Tenant] = {t.id: t for t in cfg.tenants}
        self.campaigns: dict[str, CampaignPlan] = {
            c.id: CampaignPlan(cfg, c, self.tenants[c.tenant]) for c in cfg.campaigns
        }
        self.suppliers: dict[str, SupplierPlan] = {
            s.id: SupplierPlan(
                id=s.id,
                tenant=s.tenant,
                key=resolve_secret(s.key).encode(),
                payout=money.format(money.parse(s.payout)),
                test_mode=s.test_mode,
                campaigns=frozenset(s.campaigns),
            )
            for s in cfg.suppliers
        }
        # tokens are looked up by their SHA-256, so no comparison leaks a prefix
        self.tokens: dict[bytes, str] = {
            token_digest(resolve_secret(t.api_token)): t.id for t in cfg.tenants
        }
        self.clients: dict[tuple[str, str], Client] = {(c.tenant, c.id): c for c in cfg.clients}
        self.buyer_client: dict[tuple[str, str], str] = {
            (b.tenant, b.id): b.client for b in cfg.buyers
        }

    def account_exists(self, tenant: str, account: str) -> bool:
        return account == WALLET or (tenant, account) in self.clients


async def sync_accounts(cfg: Config, store: Store) -> int:
    """Create missing accounts (with their opening balance) and update settings of the
    others, each applied to its account's state in the same step (sync_account.lua: pause
    or resume for the floor and the minimum balance, ``balance_alert`` / ``recharge_needed``
    when a threshold now lies above the balance). Auto-recharge set through the API outlives
    reloads and restarts (it is stored beside the account and wins over the file). Returns
    how many were created."""
    created = 0
    for t in cfg.tenants:
        accounts: list[tuple[str, Account, str]] = [(WALLET, t.wallet, "manual")]
        accounts += [(c.id, c, c.billing) for c in cfg.clients if c.tenant == t.id]
        for account_id, a, mode in accounts:
            armed, threshold = threshold_flags(
                await effective(store, t.id, account_id, a.auto_recharge))
            created += await store.sync_account(
                t.id,
                account_id,
                opening=money.parse(a.opening_balance),
                floor=money.parse(a.floor),
                alert=money.parse(a.alert),
                recharge_threshold=threshold,
                auto_recharge=armed,
                min_balance=None if a.min_balance is None else money.parse(a.min_balance),
                mode=mode,
            )
    return created
