"""Charge attempts: the recorded state machine behind every card charge.

An attempt is written to Redis *before* Stripe is called and after every step, so a
process killed at any point can be resumed by another one and finish the SAME attempt
with at most one successful charge:

    created --(card i: record "charging" in Redis)--> charging
    charging --Stripe ok--> succeeded --Store.adjust(op_id=PaymentIntent id)--> credited
    charging --declined / authentication_required / refused--> next card (i + 1)
    no card left --> failed, or needs_customer when a card asked for authentication

Resuming a card that is still ``charging`` first looks its PaymentIntent up (by the id
stored right after Stripe answered, else by ``metadata[attempt]`` on the customer) and
only charges when none exists; the charge also carries the deterministic idempotency key
``<tenant>:<attempt>:<card index>`` so real Stripe would replay rather than charge twice.
The credit is idempotent on the PaymentIntent id (adjust.lua ``op_id``).

Each card's tries are counted over 30 days (``keys.card_tries``): card networks penalise
more than 15 retries of one card in 30 days, so a card past :data:`MAX_CARD_TRIES_30D` is
skipped. Every transition is appended to the ``charge_audit`` stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import LockError, RedisError

from billing.stripe_gateway import Intent, StripeGateway
from engine.core import keys, money
from engine.core.billing_errors import (
    AuthenticationRequired,
    BillingError,
    Busy,
    CardDeclined,
    PaymentError,
    PaymentTransient,
    UnknownAccount,
)
from engine.store.store import Store, now_ms

ATTEMPT_TTL_S = 40 * 86_400
MAX_CARD_TRIES_30D = 10  # networks block > 15 retries of one card in 30 days
_30D_MS = 30 * 86_400_000
LOCK_TTL_S = 120.0  # one charge per account in flight; a dead holder frees it after this

Purpose = Literal["funding", "recharge"]
ChargeState = Literal["created", "charging", "succeeded", "credited", "failed", "needs_customer"]
CardState = Literal["pending", "charging", "succeeded", "declined", "auth_required", "error",
                    "skipped"]
FINAL: frozenset[str] = frozenset({"credited", "failed", "needs_customer"})


class CardTry(msgspec.Struct, kw_only=True):
    pm: str
    state: CardState = "pending"
    pi: str = ""
    code: str = ""


class ChargeAttempt(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    account: str
    purpose: Purpose
    amount: int  # micros credited
    fee: int = 0  # micros of pass-through card fee (charged on top, not credited)
    customer: str
    cards: list[CardTry]
    state: ChargeState = "created"
    index: int = 0  # the card being tried
    pi: str = ""  # the successful PaymentIntent
    entry: str = ""  # the ledger entry of the credit
    balance: str = ""
    error: str = ""
    notified: bool = False
    created_ms: int = 0
    updated_ms: int = 0
    extra: dict[str, str] = {}  # process / user / reason, copied into the ledger entry

    @property
    def gross(self) -> int:
        return self.amount + self.fee

    @property
    def gross_cents(self) -> int:
        return self.gross // 10_000


Hook = Callable[[str, ChargeAttempt], Awaitable[None]]
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(ChargeAttempt)


async def load_attempt(redis: aioredis.Redis, tenant: str, attempt_id: str
                       ) -> ChargeAttempt | None:
    """A charge attempt as recorded (None: none, or expired); read without a gateway."""
    raw = await redis.get(keys.attempt(tenant, attempt_id))
    return _dec.decode(raw) if raw else None


def idempotency_key(a: ChargeAttempt) -> str:
    return f"{a.tenant}:{a.id}:{a.index}"


class Charger:
    """Runs attempts. ``hook(step, attempt)`` is a test seam called at each step."""

    def __init__(self, store: Store, gateway: StripeGateway, *, hook: Hook | None = None,
                 max_card_tries: int = MAX_CARD_TRIES_30D) -> None:
        self.store = store
        self.redis: aioredis.Redis = store.redis
        self.gateway = gateway
        self.hook = hook
        self.max_card_tries = max_card_tries

    # -- persistence -----------------------------------------------------------------------

    async def load(self, tenant: str, attempt_id: str) -> ChargeAttempt | None:
        return await load_attempt(self.redis, tenant, attempt_id)

    async def create(self, a: ChargeAttempt) -> tuple[ChargeAttempt, bool]:
        """Record a new attempt; (the stored one, created?) -- an existing id wins."""
        a.created_ms = a.updated_ms = now_ms()
        ok = await self.redis.set(keys.attempt(a.tenant, a.id), _enc.encode(a),
                                  nx=True, ex=ATTEMPT_TTL_S)
        if ok:
            await self.redis.zadd(keys.open_attempts(a.tenant), {a.id: a.updated_ms})
            await self._audit(a, "created")
            return a, True
        prior = await self.load(a.tenant, a.id)
        assert prior is not None
        return prior, False

    async def save(self, a: ChargeAttempt) -> None:
        """Store the attempt, and keep the index of attempts not final yet (the recharge
        worker resumes the ones left behind: see :meth:`stale`)."""
        a.updated_ms = now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.attempt(a.tenant, a.id), _enc.encode(a), ex=ATTEMPT_TTL_S)
            if a.state in FINAL:
                pipe.zrem(keys.open_attempts(a.tenant), a.id)
            else:
                pipe.zadd(keys.open_attempts(a.tenant), {a.id: a.updated_ms})
            await pipe.execute()

    async def stale(self, tenant: str, *, idle_ms: int, now: int | None = None) -> list[str]:
        """Ids of the attempts not final and not updated for ``idle_ms``: left behind by a
        crash, a Stripe outage, or a payment still processing at Stripe."""
        upto = (now or now_ms()) - idle_ms
        ids = await self.redis.zrangebyscore(keys.open_attempts(tenant), 0, upto)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def forget(self, tenant: str, attempt_id: str) -> None:
        """Drop an attempt from the open index (final, or expired)."""
        await self.redis.zrem(keys.open_attempts(tenant), attempt_id)

    async def _audit(self, a: ChargeAttempt, step: str) -> None:
        card = a.cards[a.index] if a.index < len(a.cards) else None
        await self.redis.xadd(
            keys.charge_audit(a.tenant),
            {"attempt": a.id, "account": a.account, "purpose": a.purpose, "step": step,
             "state": a.state, "card": card.pm if card else "", "card_index": a.index,
             "pi": (card.pi if card else "") or a.pi, "code": card.code if card else a.error,
             "amount": a.amount, "fee": a.fee, "ts": now_ms()},
            maxlen=1_000_000, approximate=True,
        )

    async def _step(self, name: str, a: ChargeAttempt) -> None:
        if self.hook is not None:
            await self.hook(name, a)

    def lock(self, tenant: str, account: str) -> AccountLock:
        return AccountLock(self.redis, tenant, account)

    # -- running ---------------------------------------------------------------------------

    async def run(self, a: ChargeAttempt, *, lock: AccountLock) -> ChargeAttempt:
        """Drive an attempt to a final state under the account's ``lock`` (or raise
        PaymentTransient, or Busy when the lock was lost; the state is kept either way)."""
        while a.state not in FINAL:
            await lock.check()  # renewed at each step; a holder that lost it writes nothing
            if a.state == "succeeded":
                await self._credit(a)
                continue
            if a.index >= len(a.cards):
                auth = any(c.state == "auth_required" for c in a.cards)
                a.state = "needs_customer" if auth else "failed"
                a.error = "authentication_required" if auth else "all_cards_failed"
                await self.save(a)
                await self._audit(a, a.state)
                continue
            card = a.cards[a.index]
            if card.state == "charging":
                found = await self._lookup(a, card)
                if found is not None:
                    if await self._outcome(a, card, found):
                        return a  # still processing at Stripe: resumed later
                    continue
            elif card.state == "pending":
                if not await self._reserve_try(a, card):
                    card.state, card.code = "skipped", "retry_limit"
                    await self._audit(a, "card_skipped")
                    a.index += 1
                    await self.save(a)
                    continue
                card.state, a.state = "charging", "charging"
                await self.save(a)  # recorded BEFORE Stripe is called
                await self._audit(a, "charging")
            else:  # a card that already ended: move on
                a.index += 1
                await self.save(a)
                continue
            await self._charge(a, card, lock)
        return a

    async def _reserve_try(self, a: ChargeAttempt, card: CardTry) -> bool:
        key = keys.card_tries(a.tenant, card.pm)
        now = now_ms()
        await self.redis.zremrangebyscore(key, 0, now - _30D_MS)
        member = f"{a.id}:{a.index}"
        if await self.redis.zscore(key, member) is None:
            if await self.redis.zcard(key) >= self.max_card_tries:
                return False
            await self.redis.zadd(key, {member: now})
            await self.redis.pexpire(key, _30D_MS)
        return True

    async def _charge(self, a: ChargeAttempt, card: CardTry, lock: AccountLock) -> None:
        try:
            await self._step("before_charge", a)
            await lock.check()  # the last moment to learn the lock is lost: before Stripe
            intent = await self.gateway.charge(
                customer=a.customer, payment_method=card.pm, amount_cents=a.gross_cents,
                idempotency_key=idempotency_key(a),
                metadata={"tenant": a.tenant, "account": a.account, "attempt": a.id,
                          "card_index": str(a.index), "purpose": a.purpose,
                          "credit_cents": str(a.amount // 10_000),
                          "fee_cents": str(a.fee // 10_000)},
            )
        except CardDeclined as exc:
            await self._card_failed(a, card, "declined", exc.decline_code, exc.payment_intent)
            return
        except AuthenticationRequired as exc:
            await self._card_failed(a, card, "auth_required", "authentication_required",
                                    exc.payment_intent)
            return
        except PaymentTransient:
            # unknown outcome, or the same card try in flight elsewhere (PaymentBusy): the
            # card stays "charging" and the next run looks the intent up first
            raise
        except PaymentError as exc:
            await self._card_failed(a, card, "error", exc.code, "")
            return
        await self._step("after_charge", a)
        await self._outcome(a, card, intent)

    async def _card_failed(self, a: ChargeAttempt, card: CardTry, state: CardState, code: str,
                           pi: str) -> None:
        card.state, card.code, card.pi = state, code, pi
        await self._audit(a, f"card_{state}")
        a.index += 1
        await self.save(a)

    async def _lookup(self, a: ChargeAttempt, card: CardTry) -> Intent | None:
        if card.pi:
            return await self.gateway.retrieve_intent(card.pi)
        found = await self.gateway.find_intents(a.customer, "attempt", a.id)
        mine = [i for i in found if i.metadata.get("card_index") == str(a.index)]
        mine.sort(key=lambda i: i.status != "succeeded")
        return mine[0] if mine else None

    async def _outcome(self, a: ChargeAttempt, card: CardTry, intent: Intent) -> bool:
        """Apply a PaymentIntent's status; True when it is still processing."""
        card.pi = intent.id
        if intent.status == "succeeded":
            card.state, a.state, a.pi = "succeeded", "succeeded", intent.id
            await self.save(a)
            await self._audit(a, "charged")
            return False
        if intent.status == "processing":
            await self.save(a)
            return True
        if intent.status == "requires_action":
            await self._card_failed(a, card, "auth_required", "authentication_required",
                                    intent.id)
        else:
            await self._card_failed(a, card, "declined", intent.error_code or intent.status,
                                    intent.id)
        return False

    async def _credit(self, a: ChargeAttempt) -> None:
        extra = {"gross": money.format(a.gross), "card_fee": money.format(a.fee),
                 "attempt": a.id, "payment_method": a.cards[a.index].pm, **a.extra}
        await self._step("before_credit", a)
        res = await self.store.adjust(a.tenant, a.account, a.amount, a.purpose, op_id=a.pi,
                                      extra=extra)
        if not res.ok:
            # the money was taken: keep the attempt "succeeded" so it is credited later
            raise BillingError(f"credit of {a.pi} refused: {res.error}", code="credit_failed")
        a.state, a.entry, a.balance = "credited", res.entry, res.balance
        await self.save(a)
        await self._audit(a, "credited")


class AccountLock:
    """At most one charge or refund per account in flight (SET NX PX, token checked).

    The TTL only frees the lock of a holder that died: while held, a task renews it every
    third of the TTL, so a slow run (many cards, many refunds, a slow Stripe) keeps it. A
    holder can still lose it (its process paused past the TTL, the key lost in a Redis
    failover); :meth:`check`, called before each step that moves money, renews it or
    raises Busy, so such a holder stops instead of charging next to the worker that took
    over (the attempt is left as recorded, and resumed by whoever holds the lock).
    """

    def __init__(self, redis: aioredis.Redis, tenant: str, account: str, *,
                 ttl_s: float = LOCK_TTL_S, renew_every_s: float | None = None) -> None:
        # thread_local=False: the renewing task and the holder share one token
        self._lock = redis.lock(keys.rlock(tenant, account), timeout=ttl_s, blocking=False,
                                thread_local=False)
        self._every = renew_every_s if renew_every_s is not None else ttl_s / 3
        self._renewer: asyncio.Task[None] | None = None
        self.account = account
        self.lost = False
        self.renewed = asyncio.Event()  # set at each renewal (tests wait on it)

    async def __aenter__(self) -> AccountLock:
        if not await self._lock.acquire():
            raise Busy(f"a charge or refund of {self.account} is already in progress")
        self._renewer = asyncio.create_task(self._keep())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        # lost (expired, taken over): nothing to release; the attempt record is the truth
        with contextlib.suppress(LockError):
            await self._lock.release()

    async def _keep(self) -> None:
        while not self.lost:
            await asyncio.sleep(self._every)
            try:
                await self._renew()
            except (RedisError, OSError):  # unknown: retried next tick; check() raises it
                continue

    async def _renew(self) -> bool:
        """Reset the TTL if the lock is still ours (token checked in Redis)."""
        if not self.lost:
            try:
                await self._lock.reacquire()
            except LockError:
                self.lost = True
            else:
                self.renewed.set()
        return not self.lost

    async def check(self) -> None:
        """Renew the lock now, or raise Busy when it is no longer ours."""
        if not await self._renew():
            raise Busy(f"the lock of {self.account} was lost (held past its TTL, or taken "
                       "over): stopped; the attempt is resumed by the lock's holder")


async def require_account(store: Store, tenant: str, account: str) -> None:
    if await store.account(tenant, account) is None:
        raise UnknownAccount(f"unknown account {account}")
