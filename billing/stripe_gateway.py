"""A thin async wrapper over the official ``stripe`` SDK.

Only what billing needs: customers, card payment methods (attach, list, detach), off-session
charges (a PaymentIntent created and confirmed in one call), lookups of an attempt's
PaymentIntents, charges of a customer and refunds. The SDK is synchronous here and runs in
a worker thread (``asyncio.to_thread``); its own network retries are off
(``max_network_retries=0``): billing's recorded attempts decide whether to charge again.

Errors are mapped onto :mod:`engine.core.billing_errors`: issuer declines -> :class:`CardDeclined`,
3-D Secure -> :class:`AuthenticationRequired` (needs the customer, never retried),
connection trouble / 429 / 5xx -> :class:`PaymentTransient` (outcome unknown), an
idempotency conflict (409 "key in use", ``IdempotencyError``) -> :class:`PaymentBusy` (a
PaymentTransient: try again later, never a decline), anything else (bad key, bad request)
-> :class:`PaymentError`.

The secret key comes from ``LEADFLOW_STRIPE_SECRET_KEY`` and is never logged or repr'd.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import stripe

from engine.core.billing_errors import (
    AuthenticationRequired,
    CardDeclined,
    PaymentBusy,
    PaymentError,
    PaymentTransient,
    UnknownPaymentMethod,
)

ENV_KEY = "LEADFLOW_STRIPE_SECRET_KEY"
ENV_API_BASE = "LEADFLOW_STRIPE_API_BASE"
_T = TypeVar("_T")
_PAGE = 100



MAX_STRIPE_KEY = 255  # Stripe refuses a longer Idempotency-Key (400)


def stripe_key(key: str) -> str:
    """``key`` as Stripe takes it: a key over 255 characters (ours embed the tenant, the
    account and the client's own key) becomes its head and a digest of the whole, the same
    on every retry."""
    if len(key) <= MAX_STRIPE_KEY:
        return key
    return key[:180] + ":" + hashlib.sha256(key.encode()).hexdigest()

class Card(msgspec.Struct, frozen=True):
    """What we keep of a card: never its number."""

    id: str
    brand: str = ""
    last4: str = ""
    exp_month: int = 0
    exp_year: int = 0


class Intent(msgspec.Struct, frozen=True):
    """A PaymentIntent as billing sees it."""

    id: str
    status: str  # succeeded | processing | requires_action | requires_payment_method | ...
    amount: int  # cents
    payment_method: str = ""
    metadata: dict[str, str] = {}
    error_code: str = ""


class SetupState(msgspec.Struct, frozen=True):
    """A SetupIntent as Stripe has it: whose, how far, which card."""

    customer: str
    status: str  # "succeeded" once Stripe.js confirmed the card
    payment_method: str


class ChargeRecord(msgspec.Struct, frozen=True):
    id: str
    payment_intent: str
    amount: int  # cents
    amount_refunded: int
    created: int
    paid: bool


def _card(pm: Any) -> Card:
    card = getattr(pm, "card", None)
    return Card(
        id=pm.id,
        brand=str(getattr(card, "brand", "") or ""),
        last4=str(getattr(card, "last4", "") or ""),
        exp_month=int(getattr(card, "exp_month", 0) or 0),
        exp_year=int(getattr(card, "exp_year", 0) or 0),
    )


def _id(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value.id)


def _plain(obj: Any) -> dict[str, Any]:
    """A StripeObject (or None) as a plain dict."""
    if obj is None:
        return {}
    if isinstance(obj, dict) and not hasattr(obj, "to_dict"):
        return obj
    return dict(obj.to_dict())


def _meta(obj: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _plain(getattr(obj, "metadata", None)).items()}


def _intent(pi: Any) -> Intent:
    err = _plain(getattr(pi, "last_payment_error", None))
    return Intent(
        id=pi.id,
        status=str(pi.status),
        amount=int(pi.amount),
        payment_method=_id(getattr(pi, "payment_method", None)),
        metadata=_meta(pi),
        error_code=str(err.get("code", "") or ""),
    )


def _map(exc: stripe.StripeError) -> PaymentError:
    """One SDK error -> one billing error (messages are Stripe's user-facing ones)."""
    msg = exc.user_message or "payment processor error"
    code = exc.code or ""
    pi = ""
    err = (exc.json_body or {}).get("error", {}) if isinstance(exc.json_body, dict) else {}
    if isinstance(err, dict) and isinstance(err.get("payment_intent"), dict):
        pi = str(err["payment_intent"].get("id", ""))
    if isinstance(exc, stripe.CardError):
        if code == "authentication_required":
            return AuthenticationRequired(msg, payment_intent=pi)
        return CardDeclined(msg, decline_code=getattr(exc, "decline_code", None) or code
                            or "card_declined", payment_intent=pi)
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return PaymentTransient(f"stripe unreachable: {type(exc).__name__}")
    status = exc.http_status or 0
    if isinstance(exc, stripe.IdempotencyError) or status == 409:
        # "idempotency key in use": the same card try is in flight elsewhere. Read as a
        # decline, the attempt would move on and charge the backup card too.
        return PaymentBusy(f"stripe: the request is in progress elsewhere ({status}): {msg}")
    if status >= 500:
        return PaymentTransient(f"stripe error {status}")
    if status == 404:
        return UnknownPaymentMethod(f"not found at Stripe: {msg}")
    return PaymentError(f"stripe refused the request: {msg}")


class StripeGateway:
    """Async facade of a ``stripe.StripeClient``; one instance per process."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        api_base: str | None = None,
        currency: str = "usd",
        timeout_s: float = 20.0,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(ENV_KEY, "")
        if not key:
            raise PaymentError(f"no Stripe secret key: set {ENV_KEY}", code="stripe_not_configured")
        base = api_base or os.environ.get(ENV_API_BASE) or None
        self.currency = currency
        self._client = stripe.StripeClient(
            key,
            base_addresses={"api": base} if base else None,
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout_s),
        )

    def __repr__(self) -> str:  # never shows the key
        return "StripeGateway(<key hidden>)"

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except stripe.StripeError as exc:
            raise _map(exc) from None

    # -- customers and payment methods ---------------------------------------------------

    async def create_customer(
        self, *, tenant: str, account: str, idempotency_key: str
    ) -> str:
        cus = await self._call(
            self._client.v1.customers.create,
            params={"metadata": {"tenant": tenant, "account": account},
                    "description": f"leadflow {tenant}/{account}"},
            options={"idempotency_key": stripe_key(idempotency_key)},
        )
        return str(cus.id)

    async def attach(self, payment_method: str, customer: str) -> Card:
        pm = await self._call(
            self._client.v1.payment_methods.attach, payment_method,
            params={"customer": customer},
        )
        return _card(pm)

    async def list_cards(self, customer: str) -> list[Card]:
        page = await self._call(
            self._client.v1.payment_methods.list,
            params={"customer": customer, "type": "card", "limit": _PAGE},
        )
        return [_card(pm) for pm in page.data]

    async def create_setup_intent(self, customer: str, metadata: dict[str, str]
                                  ) -> tuple[str, str]:
        """A SetupIntent for a card the customer enters in Stripe.js (off-session use
        later): (its id, its client secret, for the browser only)."""
        si = await self._call(
            self._client.v1.setup_intents.create,
            params={"customer": customer, "usage": "off_session",
                    "payment_method_types": ["card"], "metadata": metadata},
        )
        return str(si.id), str(si.client_secret)

    async def retrieve_setup_intent(self, setup_intent: str) -> SetupState:
        si = await self._call(self._client.v1.setup_intents.retrieve, setup_intent)
        return SetupState(customer=_id(si.customer), status=str(si.status),
                          payment_method=_id(si.payment_method))

    async def detach(self, payment_method: str) -> None:
        await self._call(self._client.v1.payment_methods.detach, payment_method)

    # -- charges ----------------------------------------------------------------------------

    async def charge(
        self,
        *,
        customer: str,
        payment_method: str,
        amount_cents: int,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> Intent:
        """Create and confirm an off-session PaymentIntent.

        Returns the intent when it succeeded (or is ``processing``); raises CardDeclined,
        AuthenticationRequired (also when the intent comes back ``requires_action``),
        PaymentTransient or PaymentError.
        """
        params: dict[str, Any] = {
            "amount": amount_cents, "currency": self.currency, "customer": customer,
            "payment_method": payment_method, "confirm": True, "off_session": True,
            "metadata": metadata,
        }
        pi = await self._call(
            self._client.v1.payment_intents.create,
            params=params, options={"idempotency_key": stripe_key(idempotency_key)},
        )
        intent = _intent(pi)
        if intent.status == "requires_action":
            raise AuthenticationRequired(
                "the card needs the customer to authenticate", payment_intent=intent.id)
        if intent.status == "requires_payment_method":
            raise CardDeclined("the card was declined", decline_code=intent.error_code
                               or "card_declined", payment_intent=intent.id)
        return intent

    async def find_intents(self, customer: str, metadata_key: str, value: str) -> list[Intent]:
        """PaymentIntents of ``customer`` whose ``metadata[metadata_key] == value``.

        Stripe filters by customer; localstripe refuses that filter, so we fall back to
        listing every intent and filtering here (tests only ever have a few).
        """
        params: dict[str, Any] = {"customer": customer, "limit": _PAGE}
        try:
            found = await self._list_all(self._client.v1.payment_intents.list, params)
        except PaymentError as exc:
            if isinstance(exc, PaymentTransient):
                raise
            found = await self._list_all(self._client.v1.payment_intents.list,
                                         {"limit": _PAGE})
        out = []
        for pi in found:
            if _id(getattr(pi, "customer", None)) != customer:
                continue
            if _meta(pi).get(metadata_key) == value:
                out.append(_intent(pi))
        return out

    async def _list_all(self, fn: Callable[..., Any], params: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        while True:
            page = await self._call(fn, params=params)
            out.extend(page.data)
            if not page.has_more or not page.data:
                return out
            params = {**params, "starting_after": page.data[-1].id}

    async def retrieve_intent(self, payment_intent: str) -> Intent:
        pi = await self._call(self._client.v1.payment_intents.retrieve, payment_intent)
        return _intent(pi)

    async def list_charges(self, customer: str) -> list[ChargeRecord]:
        """Every charge of the customer, newest first."""
        rows = await self._list_all(self._client.v1.charges.list,
                                    {"customer": customer, "limit": _PAGE})
        out = [
            ChargeRecord(
                id=c.id, payment_intent=_id(getattr(c, "payment_intent", None)),
                amount=int(c.amount), amount_refunded=int(c.amount_refunded or 0),
                created=int(c.created), paid=bool(c.paid),
            )
            for c in rows
        ]
        out.sort(key=lambda c: c.created, reverse=True)
        return out

    async def list_refunds(self, payment_intent: str) -> list[tuple[str, int, dict[str, str]]]:
        """(refund id, cents, metadata) of every refund of a PaymentIntent."""
        rows = await self._list_all(self._client.v1.refunds.list,
                                    {"payment_intent": payment_intent, "limit": _PAGE})
        return [(str(r.id), int(r.amount),
                 r.metadata.to_dict() if getattr(r, "metadata", None) else {}) for r in rows]

    async def refund(
        self, *, payment_intent: str, amount_cents: int, idempotency_key: str,
        metadata: dict[str, str],
    ) -> str:
        ref = await self._call(
            self._client.v1.refunds.create,
            params={"payment_intent": payment_intent, "amount": amount_cents,
                    "metadata": metadata},
            options={"idempotency_key": stripe_key(idempotency_key)},
        )
        return str(ref.id)


class PaymentsNotConfigured(PaymentError):
    code = "stripe_not_configured"
    status = 503


class _Absent:
    """Any attribute path (``client.v1.customers.create``) resolves; _call refuses it."""

    def __getattr__(self, name: str) -> _Absent:
        return self


class UnconfiguredGateway(StripeGateway):
    """Stands in when no Stripe key is set: every card operation fails with a clear 503,
    while the rest of billing (manual credits, usage, history) keeps working."""

    def __init__(self) -> None:  # no client: nothing to talk to
        self.currency = "usd"
        self._client = _Absent()  # type: ignore[assignment]

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        raise PaymentsNotConfigured(f"card payments are not configured: set {ENV_KEY}")


def gateway_from_env() -> StripeGateway:
    """The real gateway when ``LEADFLOW_STRIPE_SECRET_KEY`` is set, else the stand-in."""
    return StripeGateway() if os.environ.get(ENV_KEY) else UnconfiguredGateway()
