"""Exactly once per (event id, recipient, kind): the outbox in front of a transport.

An entry is the digest of ``(event id, recipient, kind)``; two keys of the tenant
(:func:`engine.core.keys.notify`, :func:`engine.core.keys.notify_tries`, both hash-tagged
``{tenant}``) hold its state:

- ``notify:<entry>`` (STRING) is claimed with ``SET NX PX`` before sending (the value is the
  sender's random token, the TTL :attr:`Outbox.claim_ms`) and set to ``sent`` after, without
  a TTL for :attr:`Outbox.keep_ms`. A retried or replayed event finds it and sends nothing;
  a sender that died holding the claim lets it expire, so the message is sent later, once.
- ``notify:<entry>:tries`` (HASH) records failures: ``attempts``, ``last_error`` and
  ``retry_at_ms``, the time of the next attempt, with exponential backoff and full jitter
  (computed here, slept by nobody: a worker schedules it). A failure gives the claim back.
- A message the transport refused for good (:class:`~engine.notify.PermanentTransportError`)
  turns the claim into ``dead`` (kept as long as ``sent``; the tries hash keeps its
  ``last_error``, without a ``retry_at_ms``): it is not sent again, and a retried or replayed
  event finds it and does nothing (:attr:`SendOutcome.ALREADY_DEAD`).

The claim is given back, or turned into ``sent`` or ``dead``, only by the token that holds
it (WATCH / MULTI on the claim key), so a sender slower than its claim's TTL cannot undo
another's.

What stays at-least-once: the server accepted the message but the sender died before it
marked the entry sent. The Message-ID (derived from the entry) is then the same both times.
"""

from __future__ import annotations

import enum
import hashlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from engine.core import keys
from engine.core.backoff import backoff_ms
from engine.notify import NotifyError, PermanentTransportError
from engine.notify.templates import KINDS, Rendered
from engine.notify.transport import Transport

SENT: Final = "sent"
DEAD: Final = "dead"
_LAST_ERROR_MAX: Final = 500

_rng = random.SystemRandom()


def _text(value: bytes | str | None) -> str | None:
    # the client may or may not decode responses
    return value.decode() if isinstance(value, bytes) else value


class SendOutcome(enum.Enum):
    SENT = "sent"  # sent now
    ALREADY_SENT = "already_sent"  # sent before: nothing done
    IN_FLIGHT = "in_flight"  # another sender holds the claim: nothing done
    FAILED = "failed"  # the transport failed: recorded for a retry
    DEAD = "dead"  # the transport refused it for good: recorded, never retried
    ALREADY_DEAD = "already_dead"  # refused for good before: nothing done


# a claim key's final value -> what a later send finds (any other value: a sender's token)
_HELD: Final[dict[str, SendOutcome]] = {SENT: SendOutcome.ALREADY_SENT,
                                        DEAD: SendOutcome.ALREADY_DEAD}


@dataclass(frozen=True, slots=True)
class Result:
    outcome: SendOutcome
    entry: str
    attempts: int = 0  # failed attempts so far (FAILED, DEAD)
    retry_at_ms: int | None = None  # when to try again (FAILED)
    error: str | None = None  # the transport's error (FAILED, DEAD)


def entry_id(event_id: str, recipient: str, kind: str) -> str:
    """The outbox entry of ``(event id, recipient, kind)``: a digest, so a key stays short and
    holds no address. The recipient is compared case-insensitively (as mail servers do for
    the domain, and almost all for the local part)."""
    if kind not in KINDS:
        raise NotifyError(f"unknown message kind {kind!r}")
    if not event_id or not recipient:
        raise NotifyError("an outbox entry needs an event id and a recipient")
    raw = "\x00".join((event_id, recipient.strip().lower(), kind)).encode("utf-8")
    return hashlib.sha256(raw).hexdigest()[:32]


class Outbox:
    """Sends a rendered message at most once per ``(event id, recipient, kind)``."""

    def __init__(
        self,
        redis: aioredis.Redis,
        tenant: str,
        transport: Transport,
        *,
        claim_ms: int = 120_000,
        keep_ms: int = 90 * 86_400_000,
        retry_base_ms: int = 30_000,
        retry_max_ms: int = 3_600_000,
        rng: random.Random = _rng,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if claim_ms <= 0 or keep_ms <= 0 or retry_base_ms <= 0 or retry_max_ms < retry_base_ms:
            raise NotifyError("outbox: claim_ms, keep_ms, retry_base_ms must be > 0 and "
                              "retry_max_ms >= retry_base_ms")
        self.redis, self.tenant, self.transport = redis, tenant, transport
        self.claim_ms, self.keep_ms = claim_ms, keep_ms
        self.retry_base_ms, self.retry_max_ms = retry_base_ms, retry_max_ms
        self._rng, self._clock_ms = rng, clock_ms

    async def send(self, event_id: str, recipient: str, kind: str, message: Rendered) -> Result:
        """Send ``message`` unless this ``(event id, recipient, kind)`` was sent or is being
        sent, or was refused for good. A transport failure is recorded (attempts, next
        retry; or dead, when permanent) and returned, not raised; Redis errors are raised
        (nothing was sent)."""
        entry = entry_id(event_id, recipient, kind)
        claim_key = keys.notify(self.tenant, entry)
        token = secrets.token_hex(16)
        if not await self.redis.set(claim_key, token, nx=True, px=self.claim_ms):
            held = _text(await self.redis.get(claim_key))
            outcome = _HELD.get(held or "", SendOutcome.IN_FLIGHT)
            return Result(outcome, entry)
        try:
            await self.transport.send(recipient, message, key=entry)
        except PermanentTransportError as exc:
            return await self._dead(entry, token, str(exc))
        except NotifyError as exc:
            return await self._failed(entry, token, str(exc))
        await self._release(entry, token, final=SENT)
        return Result(SendOutcome.SENT, entry)

    async def tries(self, event_id: str, recipient: str, kind: str) -> tuple[int, int | None]:
        """``(failed attempts, retry_at_ms)`` of an entry (``(0, None)`` when none failed)."""
        entry = entry_id(event_id, recipient, kind)
        attempts, retry_at = await self.redis.hmget(keys.notify_tries(self.tenant, entry),
                                                    ["attempts", "retry_at_ms"])
        return int(attempts or 0), int(retry_at) if retry_at is not None else None

    async def _failed(self, entry: str, token: str, error: str) -> Result:
        tries_key = keys.notify_tries(self.tenant, entry)
        attempts = int(await self.redis.hincrby(tries_key, "attempts", 1))
        retry_at = self._clock_ms() + backoff_ms(attempts, self.retry_base_ms,
                                                 self.retry_max_ms, rng=self._rng)
        await self.redis.hset(tries_key, mapping={"last_error": error[:_LAST_ERROR_MAX],
                                                  "retry_at_ms": retry_at})
        await self.redis.pexpire(tries_key, self.keep_ms)
        await self._release(entry, token, final=None)
        return Result(SendOutcome.FAILED, entry, attempts=attempts, retry_at_ms=retry_at,
                      error=error)

    async def _dead(self, entry: str, token: str, error: str) -> Result:
        """Refused for good: the failure recorded (no next attempt) and the claim ``dead``."""
        tries_key = keys.notify_tries(self.tenant, entry)
        attempts = int(await self.redis.hincrby(tries_key, "attempts", 1))
        await self.redis.hset(tries_key, "last_error", error[:_LAST_ERROR_MAX])
        await self.redis.hdel(tries_key, "retry_at_ms")
        await self.redis.pexpire(tries_key, self.keep_ms)
        await self._release(entry, token, final=DEAD)
        return Result(SendOutcome.DEAD, entry, attempts=attempts, error=error)

    async def _release(self, entry: str, token: str, *, final: str | None) -> None:
        """Turn our claim into ``final`` (``sent``, ``dead``), or give it back (None); not a
        claim another token holds."""
        claim_key = keys.notify(self.tenant, entry)
        tries_key = keys.notify_tries(self.tenant, entry)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(claim_key)
                held = _text(await pipe.get(claim_key))
                if final is not None:
                    # ours, or expired and not taken since: sent (or dead) either way
                    if held not in (token, None):
                        return
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(claim_key, final, px=self.keep_ms)
                    if final == SENT:
                        pipe.delete(tries_key)
                else:
                    if held != token:
                        return
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(claim_key)
                await pipe.execute()
            except WatchError:
                # the claim changed under us: another sender holds it now
                return
