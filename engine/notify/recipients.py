"""Who is told about an account: its name in messages and its addresses.

A client account's messages go to the client's ``contacts``; the tenant wallet's
(:data:`engine.core.constants.WALLET`) to the tenant's ``notify.operators``.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.config import Client, Config
from engine.core.constants import WALLET


@dataclass(frozen=True, slots=True)
class Audience:
    """An account's name in messages (its client's name, or the tenant's for the wallet;
    the id when unnamed) and the addresses its messages go to."""

    name: str
    recipients: tuple[str, ...]


def client(cfg: Config, tenant: str, account: str) -> Client | None:
    """The configured client account ``account`` of ``tenant``, or None."""
    return next((c for c in cfg.clients if c.tenant == tenant and c.id == account), None)


def audience(cfg: Config, tenant_id: str, account: str) -> Audience | None:
    """The audience of ``account``; None for an account no longer configured."""
    if account == WALLET:
        tenant = cfg.tenant(tenant_id)
        return Audience(tenant.name or tenant.id, tuple(tenant.notify.operators))
    c = client(cfg, tenant_id, account)
    if c is None:
        return None
    return Audience(c.name or c.id, tuple(c.contacts))
