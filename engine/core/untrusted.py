"""Outside input (request bodies, query strings, headers, buyers' responses) read without an
exception its sender did not earn: what may go wrong is a documented refusal, never a 500.

JSON: msgspec's decoder recurses once per nested array or object (an untyped decode, and a
typed one skipping an unknown field's value) and raises :class:`RecursionError`, which is
not a :class:`msgspec.DecodeError`, past the interpreter's recursion limit: about 1,000
levels, ``'[' * 1000``, 2 KB. Every decode of outside JSON catches :data:`JSON_ERRORS`;
naming it in an ``except`` costs a valid body nothing.

Numbers: ``int()``, ``float()``, ``Decimal()``, ``str.isdigit()``/``isdecimal()``/
``isnumeric()`` and ``re``'s ``\\d`` (without ``re.ASCII``) take the digits of every script:
Arabic-Indic ``"\u0661\u0661"``, full-width ``"\uff11\uff11"`` and mathematical
``"\U0001d7d9\U0001d7d9"`` are all 11 to ``int()``, which also takes a sign, ``_`` and white
space around the digits, and raises ValueError past 4,300 digits; ``str.isdigit()`` is True
for ``"\u00b2"`` (superscript two), which ``int()`` then refuses. A number read from outside
text is ASCII digits and nothing else: :func:`ascii_int` and :func:`ascii_micros` here, or
the patterns of :mod:`engine.core.money` and :mod:`engine.routing.fields`, which spell
``[0-9]`` (or use ``re.ASCII``).
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

JSON_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
TOO_DEEP: Final = "JSON nested too deeply (arrays and objects, about 1,000 levels)"

# an e-mail address: local@domain, no spaces, quotes or angle brackets, a dotted domain
_ADDRESS: Final = re.compile(
    r"^[^\s@<>\"(),;:\\\[\]]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\Z")
MAX_ADDRESS: Final = 254  # RFC 5321's path limit
_DIGITS: Final = {10: re.compile(r"[0-9]+"), 16: re.compile(r"[0-9a-fA-F]+")}
_DECIMAL: Final = re.compile(r"([0-9]+)(?:\.([0-9]{1,6}))?")
MICROS: Final = 1_000_000


def json_problem(exc: BaseException, otherwise: str) -> str:
    """The message of a body that raised one of :data:`JSON_ERRORS`: :data:`TOO_DEEP` for
    nesting past the decoder's limit, else ``otherwise`` (invalid JSON or UTF-8)."""
    return TOO_DEEP if isinstance(exc, RecursionError) else otherwise


def ascii_int(text: str, *, max_digits: int, base: Literal[10, 16] = 10) -> int | None:
    """``text`` as an int when it is 1 to ``max_digits`` ASCII digits of ``base`` (10, or
    16: also ``a-f``/``A-F``) and nothing else: no sign, white space, ``_``, ``0x`` or digit
    of another script. Else None."""
    if len(text) <= max_digits and _DIGITS[base].fullmatch(text):
        return int(text, base)
    return None


def ascii_micros(text: str, *, max_whole_digits: int) -> int | None:
    """An unsigned decimal of ASCII digits (``"11"``, ``"0.5"``, at most 6 decimals, at most
    ``max_whole_digits`` before the point, nothing around it) in millionths. Else None."""
    m = _DECIMAL.fullmatch(text)
    if m is None or len(m.group(1)) > max_whole_digits:
        return None
    whole, frac = m.groups()
    return int(whole) * MICROS + int((frac or "").ljust(6, "0"))


def valid_address(value: str) -> bool:
    """A bare e-mail address (``ops@acme.example``), not a display name: a config's
    contacts and operators, an address of the notification preferences API."""
    return len(value) <= MAX_ADDRESS and bool(_ADDRESS.match(value))
