"""A tenant's own templates (issue #19): one override per message kind, in Redis.

The overrides of a tenant are one HASH, :func:`engine.core.keys.notify_templates` (hash-
tagged ``{tenant}``): field = the message kind, value = the JSON ``{"subject", "text",
"html"}``. An override replaces all three templates of its kind; without one the kind's
default (:func:`engine.notify.templates.default`) is used. Nothing here checks a template:
the API stores one only after :func:`engine.notify.sandbox.validate` rendered it, and
:func:`put` refuses an unknown kind.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis

from engine.core import keys
from engine.notify import NotifyError
from engine.notify.templates import KINDS, Templates


class _Stored(msgspec.Struct):
    subject: str
    text: str
    html: str


_stored = msgspec.json.Decoder(_Stored)


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise NotifyError(f"unknown message kind {kind!r}")


async def get(redis: aioredis.Redis, tenant: str, kind: str) -> Templates | None:
    """The tenant's override of ``kind``, or None (the default is used). An override that
    cannot be read (not written by :func:`put`) counts as none."""
    _check(kind)
    raw = await redis.hget(keys.notify_templates(tenant), kind)
    if raw is None:
        return None
    try:
        s = _stored.decode(raw)
    except msgspec.MsgspecError:
        return None
    return Templates(subject=s.subject, text=s.text, html=s.html)


async def put(redis: aioredis.Redis, tenant: str, kind: str, templates: Templates) -> None:
    """Store ``templates`` as the tenant's override of ``kind`` (replacing any)."""
    _check(kind)
    value = msgspec.json.encode(_Stored(templates.subject, templates.text, templates.html))
    await redis.hset(keys.notify_templates(tenant), kind, value)


async def delete(redis: aioredis.Redis, tenant: str, kind: str) -> bool:
    """Back to the default of ``kind``; True when there was an override."""
    _check(kind)
    return bool(await redis.hdel(keys.notify_templates(tenant), kind))


async def overridden(redis: aioredis.Redis, tenant: str) -> set[str]:
    """The kinds the tenant has overridden."""
    names = await redis.hkeys(keys.notify_templates(tenant))
    found = {n.decode() if isinstance(n, bytes) else n for n in names}
    return found & set(KINDS)
