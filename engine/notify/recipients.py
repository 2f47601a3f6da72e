"""Who is told about an account: its name in messages and its addresses.

A client account's messages go to the client's ``contacts`` and to the active portal users
mapped to it (#18: their addresses come from the identity store, through
:data:`PortalAddresses`, which engine.run wires), one message per address: an address that
is both a contact and a user's (compared trimmed and lower-cased) gets one. The tenant
wallet's (:data:`engine.core.constants.WALLET`) go to the tenant's ``notify.operators``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.core.config import Client, Config
from engine.core.constants import WALLET

# (tenant, client account) -> the e-mail addresses of the active portal users mapped to it
# (engine.identity.store.IdentityStore.notify_addresses)
PortalAddresses = Callable[[str, str], Awaitable[Sequence[str]]]


@dataclass(frozen=True, slots=True)
class Audience:
    """An account's name in messages (its client's name, or the tenant's for the wallet;
    the id when unnamed) and the addresses its messages go to."""

    name: str
    recipients: tuple[str, ...]


def client(cfg: Config, tenant: str, account: str) -> Client | None:
    """The configured client account ``account`` of ``tenant``, or None."""
    return next((c for c in cfg.clients if c.tenant == tenant and c.id == account), None)


def merged(*groups: Iterable[str]) -> tuple[str, ...]:
    """The addresses of ``groups`` in order, each once (compared trimmed and lower-cased,
    as the recipients' preferences are keyed): the first spelling is kept."""
    seen: set[str] = set()
    out: list[str] = []
    for group in groups:
        for address in group:
            key = address.strip().lower()
            if key not in seen:
                seen.add(key)
                out.append(address)
    return tuple(out)


async def portal_addresses(lookup: PortalAddresses | None, cfg: Config, tenant: str,
                           account: str) -> tuple[str, ...]:
    """The addresses of the portal users of a configured client account (none for the
    wallet, an account no longer configured, or without an identity store)."""
    if lookup is None or account == WALLET or client(cfg, tenant, account) is None:
        return ()
    return tuple(await lookup(tenant, account))


def audience(cfg: Config, tenant_id: str, account: str,
             portal: Sequence[str] = ()) -> Audience | None:
    """The audience of ``account``: a client's contacts, then the addresses of its portal
    users (``portal``) not among them; the wallet's operators. None for an account no
    longer configured."""
    if account == WALLET:
        tenant = cfg.tenant(tenant_id)
        return Audience(tenant.name or tenant.id, tuple(tenant.notify.operators))
    c = client(cfg, tenant_id, account)
    if c is None:
        return None
    return Audience(c.name or c.id, merged(c.contacts, portal))
