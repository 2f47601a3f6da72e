"""Who wants which messages: categories, each address's preferences, unsubscribe links.

The message kinds are grouped into :data:`CATEGORIES`. Every category is on for every
address until it is turned off, for one address of one tenant: by the tenant
(``PUT /v1/notify/preferences``), or, for the categories in :data:`OPTIONAL`, by the
recipient with the unsubscribe link of a message (docs/notifications.md says which and why).

Storage: one HASH per address of a tenant, :func:`engine.core.keys.notify_prefs`, named by
:func:`address_id` (a digest of the lower-cased address: no address in a key, a link or a
log line), field = category, value ``1`` (on) or ``0`` (off).

Unsubscribe links: ``{public_url}/v1/notify/unsubscribe?t=<token>``. The token is
``base64url(tenant "\\n" category "\\n" address id) "." base64url(HMAC-SHA256)``, keyed by a
random secret of the tenant that Redis keeps (:func:`engine.core.keys.notify_secret`,
made once with ``SET NX``, by the first link): a link names what it turns off and cannot be
made for another address or category without the secret. It does not expire; deleting the
secret invalidates every link the tenant sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis

from engine.core import keys
from engine.notify import NotifyError

CATEGORIES: Final[dict[str, tuple[str, ...]]] = {
    "balance": ("balance_alert", "balance_negative"),
    "account": ("account_paused", "account_resumed"),
    "recharge": ("recharge_succeeded", "recharge_declined", "recharge_failed",
                 "daily_cap_reached"),
    "funding": ("funding_received", "refund_processed"),
    "caps": ("cap_reached",),
    "webhooks": ("webhook_failing",),
    "returns": ("return_requested", "return_decided"),
    "reports": ("weekly_report",),
}
# what a recipient may turn off with a message's link; the others (money and the account's
# state) only the tenant may turn off, for one address (docs/notifications.md)
OPTIONAL: Final = frozenset({"caps", "webhooks", "returns", "reports"})
CATEGORY_OF: Final[dict[str, str]] = {k: c for c, kinds in CATEGORIES.items() for k in kinds}
UNSUBSCRIBE_PATH: Final = "/v1/notify/unsubscribe"
MAX_TOKEN: Final = 512

_TAG: Final = b"leadflow unsubscribe v1\x00"
_B64: Final = re.compile(r"[A-Za-z0-9_-]{1,400}")
_ADDRESS_ID: Final = re.compile(r"[0-9a-f]{32}")
_ON, _OFF = "1", "0"


class UnknownCategory(NotifyError):
    """A category that is not one of :data:`CATEGORIES`."""


def address_id(address: str) -> str:
    """The id of an address in keys and links: a digest of it, trimmed and lower-cased (as
    the outbox compares recipients)."""
    return hashlib.sha256(address.strip().lower().encode("utf-8")).hexdigest()[:32]


def category(kind: str) -> str | None:
    """The category of a message kind (None: a kind no category names, always sent)."""
    return CATEGORY_OF.get(kind)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def preferences(redis: aioredis.Redis, tenant: str, address: str) -> dict[str, bool]:
    """Every category, on or off, for ``address`` of ``tenant``."""
    stored = await redis.hgetall(keys.notify_prefs(tenant, address_id(address)))
    off = {_text(k) for k, v in stored.items() if _text(v) == _OFF}
    return {c: c not in off for c in CATEGORIES}


async def set_preferences(redis: aioredis.Redis, tenant: str, address: str,
                          changes: Mapping[str, bool]) -> dict[str, bool]:
    """Turn categories on or off for ``address``; the others stay as they are. Raises
    :class:`UnknownCategory` (nothing stored) for a category not in :data:`CATEGORIES`."""
    unknown = sorted(set(changes) - set(CATEGORIES))
    if unknown:
        raise UnknownCategory(f"unknown categories: {', '.join(unknown)} (one of "
                              f"{', '.join(CATEGORIES)})")
    if changes:
        await redis.hset(keys.notify_prefs(tenant, address_id(address)),
                         mapping={c: _ON if on else _OFF for c, on in changes.items()})
    return await preferences(redis, tenant, address)


async def wanted(redis: aioredis.Redis, tenant: str, address: str, kind: str) -> bool:
    """Whether ``address`` receives messages of ``kind`` (its category is not off)."""
    cat = category(kind)
    if cat is None:
        return True
    value = await redis.hget(keys.notify_prefs(tenant, address_id(address)), cat)
    return value is None or _text(value) != _OFF


# ---- unsubscribe links ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """What a valid token turns off: one category of one address of one tenant."""

    tenant: str
    category: str
    address_id: str


async def secret(redis: aioredis.Redis, tenant: str, *, create: bool) -> bytes | None:
    """The tenant's key of unsubscribe links; made once (``SET NX``) when ``create``, else
    None when there is none yet."""
    key = keys.notify_secret(tenant)
    value = await redis.get(key)
    if value is None and create:
        await redis.set(key, secrets.token_hex(32), nx=True)
        value = await redis.get(key)
    if value is None:
        return None
    return value if isinstance(value, bytes) else value.encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    if not _B64.fullmatch(text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _TAG + payload, hashlib.sha256).digest()


def token(key: bytes, tenant: str, address: str, cat: str) -> str:
    """The unsubscribe token of ``address`` from category ``cat`` of ``tenant``."""
    if cat not in CATEGORIES:
        raise UnknownCategory(f"unknown category {cat!r}")
    payload = "\n".join((tenant, cat, address_id(address))).encode("utf-8")
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def unsubscribe_url(public_url: str, tok: str) -> str:
    """The link of a token, under the engine's public URL."""
    return f"{public_url.rstrip('/')}{UNSUBSCRIBE_PATH}?t={tok}"


def _parse(tok: str) -> tuple[Unsubscribe, bytes, bytes] | None:
    if not tok or len(tok) > MAX_TOKEN or tok.count(".") != 1:
        return None
    head, tail = tok.split(".")
    payload, mac = _unb64(head), _unb64(tail)
    if payload is None or mac is None:
        return None
    try:
        parts = payload.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    if len(parts) != 3:
        return None
    tenant, cat, addr = parts
    if not tenant or cat not in CATEGORIES or not _ADDRESS_ID.fullmatch(addr):
        return None
    return Unsubscribe(tenant, cat, addr), payload, mac


async def verify(redis: aioredis.Redis, tok: str, tenants: Collection[str]) -> Unsubscribe | None:
    """What ``tok`` turns off, or None: malformed, of no tenant in ``tenants``, or not
    signed with the tenant's secret (forged, or the secret was deleted since)."""
    parsed = _parse(tok)
    if parsed is None:
        return None
    found, payload, mac = parsed
    if found.tenant not in tenants:
        return None
    key = await secret(redis, found.tenant, create=False)
    if key is None or not hmac.compare_digest(mac, _mac(key, payload)):
        return None
    return found


async def unsubscribe(redis: aioredis.Redis, found: Unsubscribe) -> None:
    """Turn the token's category off for its address (again: no change)."""
    await redis.hset(keys.notify_prefs(found.tenant, found.address_id), found.category, _OFF)
