"""Micro-batching of lead decisions: many concurrent requests, one Lua call.

Requests that arrive in the same event-loop turn (and while a call is in flight) are sent
together as one EVALSHA of decide.lua, which amortizes the Redis round trip and the script
call overhead over the batch. A few calls may be in flight at once so that batching never
adds a full round trip of queueing on top of a busy one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.core import keys
from engine.core.constants import WALLET
from engine.core.errors import StoreUnavailable
from engine.store import lua_protocol
from engine.store.lua_protocol import Decision, decode_reply
from engine.store.store import UNAVAILABLE, Store, now_ms

log = logging.getLogger("leadflow.batcher")
# (lead JSON, payload, candidate table entries, waiter): engine.store.lua_protocol's encoded
# LeadCall and table entries
_Item = tuple[bytes, bytes, Sequence[bytes], "asyncio.Future[Decision]"]

# (seconds, [event type, count, ...], [lead debits, fee debits]) -> None, for metrics
Observer = Callable[[float, Any, list[str]], None]


def encode_call(batch: Sequence[_Item], now: int) -> bytes:
    """decide.lua's ARGV[1] for these leads: the leads joined as they are, and the
    candidate table of them all, each buyer's entry once (the leads of a call share the
    plan's entry objects, whose hashes bytes cache: a dict drops the repeats in C)."""
    return lua_protocol.encode_call(
        now, WALLET, list(dict.fromkeys(entry for _, _, cands, _ in batch for entry in cands)),
        [lead for lead, _, _, _ in batch])


class Batcher:
    """Batches the decisions of one tenant (one Redis Cluster slot)."""

    def __init__(
        self,
        store: Store,
        tenant: str,
        *,
        max_batch: int = 64,
        max_inflight: int = 2,
        observer: Observer | None = None,
    ) -> None:
        self.store, self.tenant = store, tenant
        self.prefix = keys.tenant_prefix(tenant)
        self.max_batch, self.max_inflight = max_batch, max_inflight
        self.observer = observer
        self._pending: list[_Item] = []
        self._inflight = 0
        self._scheduled = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def decide(self, lead: bytes, payload: bytes,
                     candidates: Sequence[bytes] = ()) -> Decision:
        """Decide one lead: decide.lua's per-lead JSON object (an encoded
        :class:`~engine.store.lua_protocol.LeadCall`), the lead's delivery payload, which travels
        as its own ARGV, and the entries of the candidate table its candidates' keys refer
        to (``"key":{...}``, :func:`~engine.store.lua_protocol.table_entry`)."""
        return await self.submit(lead, payload, candidates)

    def submit(self, lead: bytes, payload: bytes,
               candidates: Sequence[bytes] = ()) -> asyncio.Future[Decision]:
        """:meth:`decide` without the coroutine: the future of the lead's decision (the
        batch endpoint awaits many together)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((lead, payload, candidates, fut))
        self._idle.clear()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._kick)
        return fut

    def _kick(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self.max_inflight:
            # the pending leads are shared out over the free call slots: one call taking
            # them all would leave the engine idle while Redis decides them, and Redis idle
            # while the engine answers them and reads the next ones (half the rate)
            size = -(-len(self._pending) // (self.max_inflight - self._inflight))
            size = min(size, self.max_batch)
            batch, self._pending = self._pending[:size], self._pending[size:]
            self._inflight += 1
            asyncio.get_running_loop().create_task(self._flush(batch))

    async def _flush(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            raw = await self.store.lua.decide(
                self.store.redis, [self.prefix],
                [encode_call(batch, now_ms()), *[x for _, x, _, _ in batch]]
            )
            reply = decode_reply(raw)
            results = reply.decisions if isinstance(reply.decisions, list) else []
            for (_, _, _, fut), decision in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(decision)
            if reply.failed:
                _log_failed(self.tenant, reply.failed)
            if self.observer is not None:
                self.observer(time.perf_counter() - started, reply.events, reply.debited)
        except UNAVAILABLE as exc:
            self._fail(batch, StoreUnavailable(f"redis unavailable: {type(exc).__name__}"))
        except Exception as exc:  # noqa: BLE001 - every waiter must be woken with the error
            self._fail(batch, exc)
        finally:
            self._inflight -= 1
            if self._pending:
                self._kick()
            elif self._inflight == 0:
                self._idle.set()

    @staticmethod
    def _fail(batch: list[_Item], exc: Exception) -> None:
        for *_, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    async def drain(self) -> None:
        """Wait until every submitted lead has its decision (graceful shutdown)."""
        await self._idle.wait()


def _log_failed(tenant: str, failed: list[list[str]] | dict[str, Any]) -> None:
    """The leads decide.lua took back (ERROR 1050): a fault of the server or of its data,
    never of the seller's input, so each is logged with the script's error text (which
    names commands and keys, never a lead's fields or a secret)."""
    for lead_id, why in failed if isinstance(failed, list) else []:
        log.error("lead %s of tenant %s not decided, nothing charged: %s", lead_id, tenant,
                  why)
