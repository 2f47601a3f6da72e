"""The wire shapes of the billing endpoints: every request and response body as a msgspec
Struct, encoded as it is and described by the OpenAPI document (engine.api.openapi).

Imports nothing of billing's logic: engine.api.billing, billing.usage, billing.methods and
billing.archive build these; the route table (engine.api.endpoints) names them. The
annotations (``Money``, ``EventId``, ...) only describe values in the document
(``extra_json_schema``): decoding checks the types, and billing's own parsing refuses a bad
value with its documented code (``invalid_amount``, ``invalid_quantity``, ...).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from engine.core.config import AutoRecharge
from engine.core.wire import EntryId, Money, MoneyOut

IDEMPOTENCY_KEY_PATTERN = "^[A-Za-z0-9_.:-]{1,128}$"
IdempotencyKey = Annotated[str, Meta(extra_json_schema={
    "pattern": IDEMPOTENCY_KEY_PATTERN, "description": "1-128 of A-Z a-z 0-9 _ . : -"})]
EventId = Annotated[str, Meta(extra_json_schema={
    "pattern": "^[A-Za-z0-9_.:-]{1,128}$",
    "description": "1-128 of A-Z a-z 0-9 _ . : - (idempotent per account and event id)"})]
Quantity = Annotated[
    Annotated[int, Meta(extra_json_schema={"minimum": 1, "maximum": 1_000_000_000})]
    | Annotated[str, Meta(extra_json_schema={"pattern": r"^[0-9]{1,9}(\.[0-9]{1,6})?$"})],
    Meta(description="units: a positive integer (at most 1e9) or a decimal string of ASCII "
                     "digits (at most 9 whole digits, 6 decimals)")]


# ---- funding and cards ---------------------------------------------------------------------


class FundBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fund the account by card: at least 100.00, whole cents; the card is charged the
    amount plus the pass-through card fee."""

    amount: Money
    idempotency_key: IdempotencyKey | None = None  # when no Idempotency-Key header is sent


class FundResult(msgspec.Struct, kw_only=True):
    attempt: str
    state: str
    amount: MoneyOut  # credited
    card_fee: MoneyOut
    charged: MoneyOut  # amount + card_fee
    payment_intent: str
    balance: MoneyOut


class AttachBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A Stripe PaymentMethod id (``pm_...``) created by Stripe.js."""

    payment_method: str


class Method(msgspec.Struct, kw_only=True):
    """A card on file: Stripe ids, brand, last4 and expiry only."""

    id: str
    brand: str = ""
    last4: str = ""
    exp_month: int = 0
    exp_year: int = 0
    active: bool = False
    primary: bool = False


class MethodList(msgspec.Struct):
    """The account's cards, the primary first."""

    data: list[Method]


class BalanceRefund(msgspec.Struct):
    """The unused balance refunded to the cards it came from; the account is closed."""

    refunded: MoneyOut
    entries: list[str]  # the ledger entries written
    closed: bool


class AutoRechargeSettings(AutoRecharge, omit_defaults=False, forbid_unknown_fields=False,
                           kw_only=True):
    """The account's auto-recharge settings, every field written."""


# ---- usage ---------------------------------------------------------------------------------


class Usage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One metered usage event, debited at the tenant's unit price."""

    account: str
    meter: str
    quantity: Quantity
    event_id: EventId
    user: str = ""


class UsageResult(msgspec.Struct, kw_only=True):
    event_id: str
    ok: bool
    cost: MoneyOut = "0.00"
    balance: str = ""
    replay: bool = False
    error: str = ""
    message: str = ""


class BatchBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """1 to 1,000 usage events, an event id at most once per account."""

    items: list[Usage]


class UsageBatchResult(msgspec.Struct):
    data: list[UsageResult]


# ---- transactions --------------------------------------------------------------------------


class Transaction(msgspec.Struct, kw_only=True):
    id: EntryId
    account: str
    type: str
    amount: MoneyOut
    balance: MoneyOut
    ref: str
    ts: int
    process: str = ""
    user: str = ""
    extra: dict[str, str] = {}


class TransactionPage(msgspec.Struct):
    """Newest first; ``next_cursor`` pages on (null on the last page)."""

    data: list[Transaction]
    next_cursor: str | None


class AlertBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The account's own balance alert: ``balance_alert`` (and its e-mail) when the balance
    falls below ``threshold``, at least 1.00; ``null``: the tenant's default (its config)
    again. An own threshold outlives config reloads."""

    threshold: Money | None


class AlertSettings(msgspec.Struct, kw_only=True):
    threshold: MoneyOut  # in force ("0.00": no alert)
    # "account": the account's own (PUT /alert), kept over reloads; "config": the tenant's
    source: Literal["account", "config"]


class Overview(msgspec.Struct, kw_only=True):
    account: str
    balance: MoneyOut
    floor: MoneyOut
    alert: MoneyOut
    alert_source: Literal["account", "config"] = "config"  # as AlertSettings.source
    paused: str  # "" or the pause reason
    closed: bool
    auto_recharge: AutoRechargeSettings
    payment_methods: list[Method]
    payment_history: list[Transaction]  # the newest funding, recharge and refund entries
    last_transactions: list[Transaction]
