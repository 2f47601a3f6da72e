"""The tenant's own webhook: its events stream, signed, to its URL (issue #19).

For tenants that want the events in their own systems (a Slack bridge, a CRM):
``[tenants.notify.webhook]`` ``url``, ``secret`` (``whsec_<base64>``, required: every
request is signed), ``events`` (the types sent; empty: every type) and ``timeout_ms``.

One consumer of the group ``hooks`` on each such tenant's events stream
(:class:`engine.store.streams.StreamConsumer`, one reader per tenant, so a slow endpoint
holds up only its own tenant). Made at the stream's end (``$``), as the notify group: a
tenant that adds a webhook is not sent its stream's history.

The request is the delivery code's (:mod:`engine.delivery.signing`: Standard Webhooks, the
buyer webhooks' signer; the process's one ``aiohttp`` session) with the payload Standard
Webhooks recommends::

    {"type": "balance_alert", "timestamp": "2026-12-07T19:00:00.123Z",
     "data": {"account": "c1", "balance": "15.00", "threshold": "20.00"}}

``data`` holds every field of the event but its type and time; amounts (:data:`MONEY`)
are decimal strings, as everywhere on the API. ``webhook-id`` is ``evt_<entry id>``, the
same on every retry, so the receiver can drop a repeat: delivery is at least once, as
Standard Webhooks has it. A 2xx answer acks the entry; anything else (or no answer)
leaves it pending, and the group's claim of idle entries sends it again (after
``claim_idle_ms``, a minute), up to :data:`MAX_DELIVERIES` times before the events
dead-letter stream. Types not in ``events`` are acked unsent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import msgspec

from engine.core import keys, money
from engine.core.config import Config, TenantWebhook, resolve_secret
from engine.core.untrusted import ascii_int
from engine.delivery.signing import Signer
from engine.store.store import UNAVAILABLE, Store
from engine.store.streams import Batch, Fields, Reader, StreamConsumer

log = logging.getLogger("leadflow.hooks")

GROUP: Final = "hooks"
MAX_DELIVERIES: Final = 20
# event fields that are amounts in micros: sent as decimal strings
MONEY: Final = frozenset({"balance", "threshold", "amount", "fee", "price", "floor",
                          "minimum", "refunded"})
_HIDDEN: Final = frozenset({b"type", b"ts"})

_encode = msgspec.json.Encoder().encode

# (tenant, event type, outcome: sent | failed | dead_lettered | skipped)
Observer = Callable[[str, str, str], None]


class Hook:
    """One tenant's webhook, resolved once: URL, signer, filter, timeout."""

    __slots__ = ("events", "host", "signer", "timeout", "url")

    def __init__(self, w: TenantWebhook) -> None:
        self.url = w.url
        self.host = urlsplit(w.url).hostname or "?"  # for logs: a path may hold a token
        self.signer = Signer(resolve_secret(w.secret))
        self.events = frozenset(w.events)
        self.timeout = aiohttp.ClientTimeout(total=max(w.timeout_ms, 1) / 1_000)

    def wants(self, etype: str) -> bool:
        return not self.events or etype in self.events


def _amount(text: str) -> str:
    """Micros as a decimal string ("-4250000" -> "-4.25"); anything else as it is."""
    negative = text.startswith("-")
    micros = ascii_int(text[1:] if negative else text, max_digits=19)
    if micros is None:
        return text
    return money.format(-micros if negative else micros)


def payload(fields: Fields) -> tuple[str, bytes]:
    """The event's type and the request body of an events entry (see the module docs)."""
    etype = fields.get(b"type", b"").decode("utf-8", "replace")
    ts = ascii_int(fields.get(b"ts", b"").decode("ascii", "replace"), max_digits=15)
    when = datetime.fromtimestamp((ts if ts is not None else time.time_ns() // 1_000_000)
                                  / 1000, UTC)
    data: dict[str, Any] = {}
    for k, v in fields.items():
        if k in _HIDDEN:
            continue
        name, text = k.decode("utf-8", "replace"), v.decode("utf-8", "replace")
        data[name] = _amount(text) if name in MONEY else text
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return etype, _encode({"type": etype, "timestamp": stamp, "data": data})


class TenantHooks:
    """This member of the ``hooks`` group, over the tenants that have a webhook."""

    def __init__(self, hooks: Mapping[str, Hook], store: Store, session: aiohttp.ClientSession,
                 *, consumer: str, claim_idle_ms: int = 60_000, claim_every_ms: int = 5_000,
                 block_ms: int | None = 1_000, max_deliveries: int = MAX_DELIVERIES,
                 observer: Observer | None = None) -> None:
        self.hooks, self.session, self.observer = dict(hooks), session, observer
        self.events = StreamConsumer(
            store.redis, GROUP, consumer, {keys.events(t): t for t in hooks}, count=50,
            block_ms=block_ms, claim_idle_ms=claim_idle_ms, claim_every_ms=claim_every_ms,
            split=True, dead_letter=lambda t: keys.dead_letter(t, "events"),
            max_deliveries=max_deliveries)

    def _observe(self, tenant: str, etype: str, outcome: str) -> None:
        if self.observer is not None:
            self.observer(tenant, etype, outcome)

    async def send(self, tenant: str, entry_id: str, fields: Fields) -> str | None:
        """POST the entry to the tenant's webhook: None when it answered 2xx (or the type
        is not sent), else why not (``http 503``, ``timeout``, ``network: <class>``)."""
        hook = self.hooks[tenant]
        etype, body = payload(fields)
        if not hook.wants(etype):
            self._observe(tenant, etype, "skipped")
            return None
        headers = {"content-type": "application/json", "user-agent": "leadflow-webhooks"}
        hook.signer.add_headers(headers, f"evt_{entry_id}", int(time.time()), body)
        try:
            async with self.session.post(hook.url, data=body, headers=headers,
                                         timeout=hook.timeout, allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"network: {type(exc).__name__}"
        if 200 <= status < 300:
            self._observe(tenant, etype, "sent")
            return None
        return f"http {status}"

    async def handle(self, tenant: str, entry_id: str, fields: Fields) -> None:
        """Send one entry; ack it when done, else leave it pending for a later claim (and
        dead-letter it after ``max_deliveries``)."""
        stream = keys.events(tenant)
        error = await self.send(tenant, entry_id, fields)
        if error is None:
            await self.events.ack(stream, entry_id)
            return
        etype = fields.get(b"type", b"").decode("utf-8", "replace")
        log.warning("tenant webhook of %s (%s): %s", tenant, self.hooks[tenant].host, error)
        if await self.events.give_up(tenant, stream, entry_id, fields, error):
            self._observe(tenant, etype, "dead_lettered")
            log.error("tenant webhook of %s: event %s dead-lettered: %s", tenant, entry_id,
                      error)
        else:
            self._observe(tenant, etype, "failed")

    async def start_group(self) -> None:
        """The group at each stream's end (``$``): see the module docs."""
        await self.events.ensure(start="$")

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set; a pass that fails (Redis down) is logged and tried
        again a second later (its entries stay pending)."""
        await self.start_group()

        async def handle(reader: Reader, batches: list[Batch]) -> int:
            taken = 0
            for batch in batches:
                if batch.gone:
                    await self.events.ack(batch.stream, *batch.gone)
                for entry_id, fields in batch.entries:
                    await self.handle(batch.tenant, entry_id, fields)
                taken += len(batch.entries)
            return taken

        def failed(reader: Reader, exc: Exception) -> None:
            if isinstance(exc, UNAVAILABLE):
                log.warning("tenant webhooks: %s; retrying", type(exc).__name__)
            else:
                log.error("tenant webhooks: pass failed", exc_info=exc)

        await self.events.run(stop, handle, survive=(Exception,), on_error=failed)


async def run_tenant_hooks(cfg: Config, store: Store, session: aiohttp.ClientSession, *,
                           consumer: str, stop: asyncio.Event, claim_idle_ms: int = 60_000,
                           claim_every_ms: int = 5_000,
                           observer: Observer | None = None) -> None:
    """The webhooks of every tenant with ``[tenants.notify.webhook]``; none: nothing to do
    until stopped."""
    hooks = {t.id: Hook(t.notify.webhook) for t in cfg.tenants if t.notify.webhook is not None}
    if not hooks:
        await stop.wait()
        return
    worker = TenantHooks(hooks, store, session, consumer=consumer,
                         claim_idle_ms=claim_idle_ms, claim_every_ms=claim_every_ms,
                         observer=observer)
    await worker.run(stop)


__all__ = ["GROUP", "MAX_DELIVERIES", "MONEY", "Hook", "TenantHooks", "payload",
           "run_tenant_hooks"]
