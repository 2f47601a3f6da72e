"""What a buyer's response means: ACCEPTED, DUPLICATED, REJECTED, or retry later.

Order of evaluation (docs/delivery.md):

1. 5xx and 429 are *retryable* (the buyer could not decide); so are timeouts and network
   errors, which never reach this module.
2. Any ``duplicate`` rule matches -> DUPLICATED.
3. ``accept`` rules: any matches -> ACCEPTED; with no accept rules any 2xx is ACCEPTED.
4. Everything else -> REJECTED.

A rule's conditions (status, JSON path equals/truthy, substring, regex) must all hold.
JSON is parsed at most once per response and numbers are kept as ``Decimal`` (money is
never a float). An ACCEPTED verdict may carry a real-time price read at ``price_path``,
capped at ``max_price`` (default: the buyer's configured price, so without ``max_price``
a buyer can only lower its price).
"""

from __future__ import annotations

import decimal
import enum
from typing import Any

import msgspec

from engine.core import money
from engine.core.billing_errors import MoneyError
from engine.core.config import Delivery, ResponseRule
from engine.core.regex import RegexError, compile_re2
from engine.core.untrusted import JSON_ERRORS, ascii_int
from engine.delivery import DeliveryError

_json = msgspec.json.Decoder(float_hook=decimal.Decimal)
_MISSING = object()


class BuyerVerdict(enum.StrEnum):
    ACCEPTED = "ACCEPTED"
    DUPLICATED = "DUPLICATED"
    REJECTED = "REJECTED"


class Verdict(msgspec.Struct, frozen=True, gc=False):
    outcome: BuyerVerdict
    reason: str
    price: int | None = None  # real-time price (micros) of an accepted lead, when read


class RuleError(DeliveryError):
    """A response rule or price setting is invalid."""


def is_retryable(status: int) -> bool:
    """5xx and 429: the buyer did not decide; try again later."""
    return status >= 500 or status == 429


def _path_parts(path: str) -> tuple[str, ...]:
    p = path.removeprefix("$").removeprefix(".")
    return tuple(part for part in p.split(".") if part)


def json_path(doc: Any, parts: tuple[str, ...]) -> Any:
    """The value at a dotted path (list indexes are numbers); ``_MISSING`` if absent."""
    cur = doc
    for part in parts:
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list):
            i = _index(part)
            if i is None or not -len(cur) <= i < len(cur):
                return _MISSING
            cur = cur[i]
        else:
            return _MISSING
    return cur


def _index(part: str) -> int | None:
    """A list index of a path (``0``, ``-1``: ASCII digits, one optional minus), else None
    (``"²"`` passed ``str.isdigit()`` and ``"--1"`` its ``lstrip("-")``, and int() raised)."""
    i = ascii_int(part.removeprefix("-"), max_digits=18)
    return None if i is None else (-i if part.startswith("-") else i)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


class _Body:
    """A response body with its text decoded and its JSON parsed lazily, once each."""

    __slots__ = ("_doc", "_text", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._text: str | None = None
        self._doc: Any = _MISSING

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.raw.decode("utf-8", "replace")
        return self._text

    def doc(self) -> Any:
        if self._doc is _MISSING:
            try:
                self._doc = _json.decode(self.raw)
            except (*JSON_ERRORS, ValueError):  # nested too deeply too: not JSON to us
                self._doc = None
        return self._doc


class _Rule:
    __slots__ = ("accepted", "contains", "description", "duplicate", "equals", "parts", "path",
                 "regex", "status")

    def __init__(self, rule: ResponseRule) -> None:
        self.status = frozenset(rule.status)
        self.path = rule.path
        self.parts = _path_parts(rule.path) if rule.path else ()
        self.equals = rule.equals.casefold() if rule.equals is not None else None
        self.contains = rule.contains
        try:  # RE2: matched against what the buyer's server sends (engine.core.regex)
            self.regex = compile_re2(rule.regex) if rule.regex else None
        except RegexError as exc:
            raise RuleError(f"{rule.regex!r}: {exc}") from exc
        if not (self.status or self.path or self.contains or self.regex):
            raise RuleError("a response rule needs status, path, contains or regex")
        if self.equals is not None and not self.path:
            raise RuleError("'equals' needs a 'path'")
        self.description = self._describe()
        # the verdicts this rule gives, built once (most responses of a buyer match one rule)
        self.accepted = Verdict(BuyerVerdict.ACCEPTED, "accepted: " + self.description)
        self.duplicate = Verdict(BuyerVerdict.DUPLICATED, "duplicate: " + self.description)

    def matches(self, status: int, body: _Body) -> bool:
        if self.status and status not in self.status:
            return False
        if self.contains is not None and self.contains not in body.text:
            return False
        if self.regex is not None and self.regex.search(body.text) is None:
            return False
        if self.path:
            value = json_path(body.doc(), self.parts)
            if self.equals is not None:
                if isinstance(value, str):
                    return value.casefold() == self.equals
                return value is not _MISSING and _text(value).casefold() == self.equals
            return value not in (_MISSING, None, False, "")
        return True

    def _describe(self) -> str:
        bits = []
        if self.status:
            bits.append(f"status in {sorted(self.status)}")
        if self.path:
            bits.append(f"{self.path} = {self.equals!r}" if self.equals is not None
                        else f"{self.path} set")
        if self.contains is not None:
            bits.append(f"body contains {self.contains!r}")
        if self.regex is not None:
            bits.append(f"body matches {self.regex.pattern!r}")
        return " and ".join(bits)


class ResponseMapper:
    """One buyer's response rules, compiled once."""

    __slots__ = ("_accept", "_duplicate", "_max_price", "_price_parts")

    def __init__(self, delivery: Delivery, *, buyer_price: int) -> None:
        self._accept = [_Rule(r) for r in delivery.accept]
        self._duplicate = [_Rule(r) for r in delivery.duplicate]
        self._price_parts = _path_parts(delivery.price_path) if delivery.price_path else None
        try:
            self._max_price = (money.parse(delivery.max_price, field="max_price")
                               if delivery.max_price is not None else buyer_price)
        except MoneyError as exc:
            raise RuleError(str(exc)) from exc

    def classify(self, status: int, raw: bytes) -> Verdict:
        """The verdict of a non-retryable response (check :func:`is_retryable` first)."""
        body = _Body(raw)
        for rule in self._duplicate:
            if rule.matches(status, body):
                return rule.duplicate
        if self._accept:
            for rule in self._accept:
                if rule.matches(status, body):
                    accepted = rule.accepted
                    break
            else:
                return Verdict(BuyerVerdict.REJECTED,
                               f"rejected: HTTP {status}, no accept rule matched")
        elif 200 <= status < 300:
            accepted = Verdict(BuyerVerdict.ACCEPTED, f"accepted: HTTP {status}")
        else:
            return Verdict(BuyerVerdict.REJECTED, f"rejected: HTTP {status}")
        if self._price_parts is None:
            return accepted
        return Verdict(BuyerVerdict.ACCEPTED, accepted.reason, self._price(body))

    def _price(self, body: _Body) -> int | None:
        if self._price_parts is None:
            return None
        value = json_path(body.doc(), self._price_parts)
        if isinstance(value, bool) or not isinstance(value, int | str | decimal.Decimal):
            return None
        try:
            price = money.parse(str(value), field="price")
        except MoneyError:
            return None
        if price < 0:
            return None
        return min(price, self._max_price)
