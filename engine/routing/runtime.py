"""The compiled, immutable view of a config that request handlers read.

A reload builds a new Runtime completely and then swaps one reference, so a request sees
either the old config or the new one, never half of each; the money itself is decided in
Lua against Redis state, which a reload never rewrites (only account settings).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from engine.core import money
from engine.core.config import Client, Config, Tenant, resolve_secret
from engine.core.constants import WALLET
from engine.routing.plans import CampaignPlan


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

