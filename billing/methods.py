"""Payment methods of an account: one Stripe Customer, a primary card and backups.

Seed 004: a primary payment method and backups that are used, in order, only once they
have been *activated*. The first card attached becomes the (active) primary; later cards
are inactive backups until activated. The primary cannot be deactivated; detaching it
promotes the first active backup.

Redis holds the customer id and the ordered method list (``keys.pay``); Stripe holds the
cards. Only Stripe ids, brand, last4 and expiry are stored -- never a card number.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from billing.schemas import Method
from billing.stripe_gateway import Card, StripeGateway
from engine.core import keys
from engine.core.billing_errors import InvalidRequest, NoPaymentMethod, UnknownPaymentMethod

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(list[Method])


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _check_pm(pm: str) -> None:
    if not isinstance(pm, str) or not pm.startswith("pm_") or not 3 < len(pm) <= 255:
        # the value is never echoed: a client may send a card number here by mistake
        raise InvalidRequest("payment method: not a Stripe PaymentMethod id (pm_...)",
                             code="invalid_payment_method")


def _normalize(methods: list[Method]) -> list[Method]:
    """[0] is the primary. A card becomes active only by the customer's act: attached as the
    account's first card, activated, or made primary; a backup promoted because the primary
    was detached keeps its flag, so a card never activated is never charged (seed 004)."""
    for i, m in enumerate(methods):
        m.primary = i == 0
    return methods


class Methods:
    """Payment methods of a tenant's accounts."""

    def __init__(self, redis: aioredis.Redis, gateway: StripeGateway) -> None:
        self.redis = redis
        self.gateway = gateway

    async def customer(self, tenant: str, account: str, *, create: bool = False) -> str:
        """The account's Stripe Customer id ("" when none and ``create`` is false)."""
        key = keys.pay(tenant, account)
        raw = await self.redis.hget(key, "customer")
        if raw:
            return _text(raw)
        if not create:
            return ""
        # deterministic idempotency key: a retry after a crash gets the same customer
        cus = await self.gateway.create_customer(
            tenant=tenant, account=account, idempotency_key=f"customer:{tenant}:{account}")
        if await self.redis.hsetnx(key, "customer", cus):
            return cus
        raw = await self.redis.hget(key, "customer")
        return _text(raw) if raw else cus

    async def all(self, tenant: str, account: str) -> list[Method]:
        raw = await self.redis.hget(keys.pay(tenant, account), "methods")
        return _dec.decode(raw) if raw else []

    async def chargeable(self, tenant: str, account: str) -> list[Method]:
        """The cards to try, in order: the primary, then every activated backup."""
        return [m for m in await self.all(tenant, account) if m.active]

    async def _update(
        self, tenant: str, account: str, change: Callable[[list[Method]], list[Method]]
    ) -> list[Method]:
        key = keys.pay(tenant, account)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, "methods")
                    methods = _normalize(change(_dec.decode(raw) if raw else []))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, "methods", _enc.encode(methods))
                    await pipe.execute()
                    return methods
                except WatchError:
                    continue

    async def attach(self, tenant: str, account: str, payment_method: str) -> Method:
        """Attach a PaymentMethod (created client-side by Stripe.js) to the account."""
        _check_pm(payment_method)
        cus = await self.customer(tenant, account, create=True)
        card: Card = await self.gateway.attach(payment_method, cus)
        new = Method(id=card.id, brand=card.brand, last4=card.last4,
                     exp_month=card.exp_month, exp_year=card.exp_year)

        def add(ms: list[Method]) -> list[Method]:
            rest = [m for m in ms if m.id != new.id]
            if not rest:  # the account's only card: its primary, in use at once
                new.active = True
            return [*rest, new]

        methods = await self._update(tenant, account, add)
        return next(m for m in methods if m.id == new.id)

    @staticmethod
    def _find(ms: list[Method], pm: str) -> Method:
        for m in ms:
            if m.id == pm:
                return m
        raise UnknownPaymentMethod(f"payment method {pm} is not on this account")

    async def activate(self, tenant: str, account: str, pm: str) -> list[Method]:
        def on(ms: list[Method]) -> list[Method]:
            self._find(ms, pm).active = True
            return ms

        return await self._update(tenant, account, on)

    async def deactivate(self, tenant: str, account: str, pm: str) -> list[Method]:
        def off(ms: list[Method]) -> list[Method]:
            m = self._find(ms, pm)
            if ms[0].id == pm:
                raise InvalidRequest("the primary payment method cannot be deactivated; "
                                     "make another card primary first", code="is_primary")
            m.active = False
            return ms

        return await self._update(tenant, account, off)

    async def set_primary(self, tenant: str, account: str, pm: str) -> list[Method]:
        def first(ms: list[Method]) -> list[Method]:
            m = self._find(ms, pm)
            m.active = True
            return [m, *(x for x in ms if x.id != pm)]

        return await self._update(tenant, account, first)

    async def detach(self, tenant: str, account: str, pm: str) -> list[Method]:
        self._find(await self.all(tenant, account), pm)
        await self.gateway.detach(pm)

        def drop(ms: list[Method]) -> list[Method]:
            rest = [m for m in ms if m.id != pm]
            # promote the first active backup when the primary goes
            if ms and ms[0].id == pm:
                rest.sort(key=lambda m: not m.active)
            return rest

        return await self._update(tenant, account, drop)

    async def setup_intent(self, tenant: str, account: str) -> str:
        """A SetupIntent on the account's Customer, for a card entered in Stripe.js: its
        client secret (for the browser; never logged or stored)."""
        cus = await self.customer(tenant, account, create=True)
        _, secret = await self.gateway.create_setup_intent(
            cus, {"tenant": tenant, "account": account})
        return secret

    async def setup_card(self, tenant: str, account: str, setup_intent: str) -> str:
        """The card a confirmed SetupIntent of this account's Customer set up (its
        PaymentMethod id, to attach as any card is). A SetupIntent of another Customer, not
        confirmed, or unknown is refused: the id comes from the browser."""
        if not (isinstance(setup_intent, str) and setup_intent.startswith("seti_")
                and 5 < len(setup_intent) <= 255):
            raise InvalidRequest("setup_intent: not a Stripe SetupIntent id (seti_...)",
                                 code="invalid_setup_intent")
        cus = await self.customer(tenant, account)
        try:
            si = await self.gateway.retrieve_setup_intent(setup_intent)
        except UnknownPaymentMethod:  # a 404 at Stripe
            si = None
        if not cus or si is None or si.customer != cus:
            raise InvalidRequest("setup_intent: no card set up for this account",
                                 code="invalid_setup_intent")
        if si.status != "succeeded" or not si.payment_method.startswith("pm_"):
            raise InvalidRequest("the card was not confirmed: enter it again",
                                 code="setup_incomplete")
        return si.payment_method

    async def require(self, tenant: str, account: str) -> tuple[str, list[Method]]:
        """(customer, chargeable cards) or NoPaymentMethod."""
        cus = await self.customer(tenant, account)
        cards = await self.chargeable(tenant, account) if cus else []
        if not cards:
            raise NoPaymentMethod(f"account {account} has no payment method on file")
        return cus, cards
