"""Money as integers.

Every amount inside leadflow is an ``int`` of *micros* (millionths of the currency unit,
so ``$1.00 == 1_000_000``). Amounts cross the API and config boundary as decimal strings
such as ``"25.00"``; floats are refused everywhere, because ``0.1 + 0.2`` is not money.
"""

from __future__ import annotations

import re

from engine.core.billing_errors import MoneyError

MICROS = 1_000_000
# Lua in Redis keeps numbers as doubles: integers are exact only below 2**53.
# Cap every amount (and every balance) well below that.
MAX_ABS_MICROS = 10**15  # $1,000,000,000.00

# ASCII digits only (``\d`` would take other scripts' digits), and the whole string: no
# surrounding white space, no trailing newline
_DECIMAL = re.compile(r"(-)?([0-9]{1,10})(?:\.([0-9]{1,6}))?")


def parse(text: str, *, field: str = "amount") -> int:
    """Parse a decimal string (``"12.5"``, ``"-20.00"``) into micros.

    Refuses floats, exponents, more than 6 decimals, and magnitudes that Lua
    could not hold exactly.
    """
    if not isinstance(text, str):
        raise MoneyError(f'{field}: expected a decimal string such as "25.00"')
    m = _DECIMAL.fullmatch(text)
    if m is None:
        raise MoneyError(f"{field}: {text!r} is not a decimal amount (at most 6 decimals)")
    sign, whole, frac = m.groups()
    value = int(whole) * MICROS + int((frac or "").ljust(6, "0"))
    if value > MAX_ABS_MICROS:
        raise MoneyError(f"{field}: {text!r} is out of range")
    return -value if sign else value


def format(micros: int) -> str:
    """Render micros as a decimal string with at least two decimals: ``"25.00"``, ``"0.125"``."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def parse_percent(text: str, *, field: str = "percent") -> int:
    """Parse ``"3"`` or ``"2.5"`` (percent) into basis points (``300``, ``250``)."""
    m = re.fullmatch(r"([0-9]{1,3})(?:\.([0-9]{1,2}))?", text) if isinstance(text, str) else None
    if m is None:
        raise MoneyError(f'{field}: {text!r} is not a percentage such as "3" or "2.5"')
    whole, frac = m.groups()
    return int(whole) * 100 + int((frac or "").ljust(2, "0"))
