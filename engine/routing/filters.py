"""Buyer filters compiled into predicates over a normalized lead (pure, hot path).

A :class:`BuyerFilter` is built once from a buyer's ``list[config.Filter]``; every regex,
set and bound is prepared then, so :meth:`BuyerFilter.matches` is a loop of cheap tests.

Semantics (every filter must pass):

==========  =======================================================================
op          an *allow* filter passes when the lead's value ...
==========  =======================================================================
``in``      equals one of ``values``, case-insensitively
``regex``   contains a match of ``pattern`` (RE2 syntax, linear time; case-sensitive
            unless the pattern says ``(?i)``)
``range``   is a decimal number with ``min <= value <= max`` (either bound optional);
            a non-numeric value fails
``states``  upper-cased, is one of ``values`` (2-letter codes, checked at load)
``zips``    starts with 5 digits (``12345`` or ``12345-6789``) that equal a 5-digit
            entry or start with a 3-digit entry (a sectional-center prefix)
==========  =======================================================================

``action = "block"`` inverts the test. A *missing* field (absent or empty) fails an allow
filter and passes a block filter, whatever the op: "block leads from CA" must not block a
lead that has no state, and "only CA" must not accept it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import NamedTuple

from engine.core.config import Filter
from engine.core.errors import ConfigError
from engine.core.regex import RegexError, compile_re2
from engine.routing.fields import STATES, parse_decimal

__all__ = ["BuyerFilter"]

Test = Callable[[str], bool]

_ZIP_ENTRY = re.compile(r"[0-9]{3}(?:[0-9]{2})?", re.ASCII)
_LEAD_ZIP = re.compile(r"([0-9]{5})(?:-[0-9]{4})?", re.ASCII)


class _Compiled(NamedTuple):
    field: str
    test: Test
    block: bool
    what: str  # for describe_failure only: "in [CA, NY]", "matches '^a'", ...


class BuyerFilter:
    """A buyer's filters; build once, call :meth:`matches` per lead."""

    __slots__ = ("_filters",)

    def __init__(
        self,
        filters: Sequence[Filter],
        *,
        source: str = "<config>",
        path_prefix: str = "filters",
    ) -> None:
        self._filters = tuple(
            _compile(f, source, f"{path_prefix}[{i}]") for i, f in enumerate(filters)
        )

    def __len__(self) -> int:
        return len(self._filters)

    def matches(self, lead: Mapping[str, str]) -> bool:
        """True when every filter passes."""
        for field, test, block, _ in self._filters:
            value = lead.get(field)
            if not value:
                if not block:
                    return False
            elif test(value) == block:  # allow: test must hold; block: must not
                return False
        return True

    def describe_failure(self, lead: Mapping[str, str]) -> str | None:
        """A short reason naming the first failing filter, or None when the lead matches."""
        for field, test, block, what in self._filters:
            value = lead.get(field)
            if not value:
                if not block:
                    return f"{field}: missing (must be {what})"
            elif test(value) == block:
                verdict = f"is {what} (blocked)" if block else f"is not {what}"
                return f"{field}: {_shorten(value)!r} {verdict}"
        return None


def _shorten(value: str, limit: int = 40) -> str:
    # reasons end up in stored REJECTED records: never copy a whole free-text field in
    return value if len(value) <= limit else value[: limit - 3] + "..."


# --- compilation -------------------------------------------------------------------------


def _compile(spec: Filter, source: str, path: str) -> _Compiled:
    block = spec.action == "block"
    test, what = _COMPILERS[spec.op](spec, source, path)
    return _Compiled(spec.field, test, block, what)


def _in(spec: Filter, source: str, path: str) -> tuple[Test, str]:
    allowed = frozenset(v.strip().casefold() for v in _values(spec, source, path))

    def test(value: str) -> bool:
        return value.casefold() in allowed

    return test, f"in {_list(spec.values)}"


def _regex(spec: Filter, source: str, path: str) -> tuple[Test, str]:
    if not spec.pattern:
        raise ConfigError(source, f"{path}.pattern", "a regex filter needs a pattern")
    try:  # RE2: the value comes from the seller (engine.core.regex)
        search = compile_re2(spec.pattern).search
    except RegexError as exc:
        raise ConfigError(source, f"{path}.pattern", str(exc)) from exc

    def test(value: str) -> bool:
        return search(value) is not None

    return test, f"matching {spec.pattern!r}"


def _range(spec: Filter, source: str, path: str) -> tuple[Test, str]:
    low = _bound(spec.min, source, f"{path}.min")
    high = _bound(spec.max, source, f"{path}.max")
    if low is None and high is None:
        raise ConfigError(source, path, "a range filter needs min or max")
    if low is not None and high is not None and low > high:
        raise ConfigError(source, f"{path}.min", "min is greater than max")
    return _range_test(low, high), _range_text(spec)


def _range_test(low: Decimal | None, high: Decimal | None) -> Test:
    # One closure per shape so the per-lead test does no None checks on the bounds.
    if low is not None and high is not None:
        return _between(low, high)
    if low is not None:
        return _at_least(low)
    if high is not None:
        return _at_most(high)
    raise ValueError("a range needs a bound")  # _range() refuses this config first


# A lead's value as a number, parsed once per lead rather than once per range filter: a
# campaign's buyers filter the same few fields (200 buyers with a range on monthly_bill
# parsed it 200 times a lead). Decimals are immutable; the cache holds recent texts only.
_number = functools.lru_cache(maxsize=1024)(parse_decimal)


def _between(low: Decimal, high: Decimal) -> Test:
    def test(value: str) -> bool:
        number = _number(value)
        return number is not None and low <= number <= high

    return test


def _at_least(low: Decimal) -> Test:
    def test(value: str) -> bool:
        number = _number(value)
        return number is not None and number >= low

    return test


def _at_most(high: Decimal) -> Test:
    def test(value: str) -> bool:
        number = _number(value)
        return number is not None and number <= high

    return test


def _range_text(spec: Filter) -> str:
    low = "" if spec.min is None else str(spec.min)
    high = "" if spec.max is None else str(spec.max)
    return f"in range [{low}, {high}]"


def _bound(value: int | str | None, source: str, path: str) -> Decimal | None:
    if value is None:
        return None
    parsed = Decimal(value) if type(value) is int else parse_decimal(str(value))
    if parsed is None:
        raise ConfigError(source, path, f"{value!r} is not a decimal number")
    return parsed


def _states(spec: Filter, source: str, path: str) -> tuple[Test, str]:
    codes = set()
    for i, raw in enumerate(_values(spec, source, path)):
        code = raw.strip().upper()
        if code not in STATES:
            raise ConfigError(source, f"{path}.values[{i}]", f"unknown state code {raw!r}")
        codes.add(code)
    allowed = frozenset(codes)

    def test(value: str) -> bool:
        return value.upper() in allowed

    return test, f"in states {_list(sorted(allowed))}"


def _zips(spec: Filter, source: str, path: str) -> tuple[Test, str]:
    fives: set[str] = set()
    threes: set[str] = set()
    for i, raw in enumerate(_values(spec, source, path)):
        entry = raw.strip()
        if not _ZIP_ENTRY.fullmatch(entry):
            reason = f"{raw!r} is neither a 5-digit ZIP nor a 3-digit prefix"
            raise ConfigError(source, f"{path}.values[{i}]", reason)
        (fives if len(entry) == 5 else threes).add(entry)
    exact, prefixes = frozenset(fives), frozenset(threes)
    match = _LEAD_ZIP.fullmatch

    def test(value: str) -> bool:
        found = match(value)
        if found is None:
            return False
        zip5 = found.group(1)
        return zip5 in exact or zip5[:3] in prefixes

    return test, f"in ZIPs {_list(spec.values)}"


def _values(spec: Filter, source: str, path: str) -> list[str]:
    if not spec.values:
        raise ConfigError(source, f"{path}.values", f"an {spec.op!r} filter needs values")
    return spec.values


def _list(values: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(values[:limit])
    return f"[{shown}, ...]" if len(values) > limit else f"[{shown}]"


_COMPILERS: dict[str, Callable[[Filter, str, str], tuple[Test, str]]] = {
    "in": _in,
    "regex": _regex,
    "range": _range,
    "states": _states,
    "zips": _zips,
}
