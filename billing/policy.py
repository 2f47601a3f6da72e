"""The rules our seed pages set for funding and auto-recharge, in one place.

Seed 000 (fund your account): manual funding at least $100.00; auto-recharge threshold at
least $20.00 and amount at least $100.00. Seed 001 (customer portal): a card fee passed on
to the buyer of at most 15 %. Cards are charged in whole cents.
"""

from __future__ import annotations

import msgspec

from engine.core import keys, money
from engine.core.billing_errors import InvalidRequest
from engine.core.config import AutoRecharge
from engine.store.store import Store

MIN_FUNDING = 100 * money.MICROS
MAX_FUNDING = 1_000_000 * money.MICROS
MAX_FEE_BP = 1_500  # 15%
CENT = 10_000  # micros
MIN_THRESHOLD = 20 * money.MICROS
MIN_AMOUNT = 100 * money.MICROS
MIN_ALERT = 1 * money.MICROS  # seed 001: balance alerts at least $1.00
_ar_dec = msgspec.json.Decoder(AutoRecharge)


def check_card_amount(amount: int, *, minimum: int, field: str = "amount") -> None:
    """A card amount: whole cents, at least ``minimum``, at most MAX_FUNDING."""
    if amount < minimum:
        raise InvalidRequest(f"{field}: the minimum is ${money.format(minimum)}",
                             code="amount_too_small")
    if amount > MAX_FUNDING:
        raise InvalidRequest(f"{field}: the maximum is ${money.format(MAX_FUNDING)}",
                             code="amount_too_large")
    if amount % CENT:
        raise InvalidRequest(f"{field}: cards are charged in whole cents",
                             code="invalid_amount")


def validate(ar: AutoRecharge) -> None:
    """Seed 000: threshold at least $20.00, amount at least $100.00; sane caps."""
    threshold = money.parse(ar.threshold, field="threshold")
    amount = money.parse(ar.amount, field="amount")
    cap = money.parse(ar.max_amount_per_day, field="max_amount_per_day")
    if threshold < MIN_THRESHOLD:
        raise InvalidRequest("threshold: the minimum is $20.00", code="threshold_too_small")
    check_card_amount(amount, minimum=MIN_AMOUNT)
    if ar.every_days is not None and not 1 <= ar.every_days <= 366:
        raise InvalidRequest("every_days: 1 to 366", code="invalid_schedule")
    if not 1 <= ar.max_per_day <= 100:
        raise InvalidRequest("max_per_day: 1 to 100", code="invalid_cap")
    if cap < amount:
        raise InvalidRequest("max_amount_per_day: at least one recharge amount",
                             code="invalid_cap")


def check_alert(text: str) -> int:
    """A balance alert threshold (PUT /alert): a decimal string of at least $1.00, in micros."""
    alert = money.parse(text, field="threshold")
    if alert < MIN_ALERT:
        raise InvalidRequest(f"threshold: the minimum is ${money.format(MIN_ALERT)}",
                             code="alert_too_small")
    return alert


def threshold_flags(ar: AutoRecharge) -> tuple[bool, int]:
    """(armed, threshold micros) for the Lua machinery: only threshold mode emits
    ``recharge_needed``; schedule mode recharges on its own clock."""
    armed = ar.enabled and ar.every_days is None
    return armed, money.parse(ar.threshold) if armed else 0


async def effective(store: Store, tenant: str, account: str, base: AutoRecharge
                    ) -> AutoRecharge:
    """The settings in force: the API's override (PUT /auto-recharge) over the config's."""
    raw = await store.redis.get(keys.autorecharge(tenant, account))
    return _ar_dec.decode(raw) if raw else base
