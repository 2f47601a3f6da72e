"""engine.routing.filters: every op, block filters, missing fields, config errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.config import Filter
from engine.core.errors import ConfigError
from engine.routing.fields import STATES
from engine.routing.filters import BuyerFilter


def allow(**kw: object) -> Filter:
    return Filter(**kw)  # type: ignore[arg-type]


def block(**kw: object) -> Filter:
    return Filter(action="block", **kw)  # type: ignore[arg-type]


CASES: list[tuple[Filter, str, bool]] = [
    # in: case-insensitive equality
    (allow(field="f", values=["Own", "Rent"]), "own", True),
    (allow(field="f", values=["Own", "Rent"]), "RENT", True),
    (allow(field="f", values=["Own", "Rent"]), "Owner", False),
    (allow(field="f", values=["Own", "Rent"]), "Ow", False),
    (allow(field="f", values=[" Own "]), "own", True),
    (allow(field="f", values=["Stra\u00dfe"]), "STRASSE", True),  # casefold, not lower
    # regex: search, compiled once
    (allow(field="f", op="regex", pattern=r"^\d{3}"), "212abc", True),
    (allow(field="f", op="regex", pattern=r"^\d{3}"), "a212", False),
    (allow(field="f", op="regex", pattern=r"gmail\.com$"), "x@gmail.com", True),
    (allow(field="f", op="regex", pattern=r"gmail"), "x@GMAIL.com", False),
    (allow(field="f", op="regex", pattern=r"(?i)gmail"), "x@GMAIL.com", True),
    (allow(field="f", op="regex", pattern=r"b"), "abc", True),  # search, not match
    # range: inclusive, Decimal
    (allow(field="f", op="range", min=18, max=65), "18", True),
    (allow(field="f", op="range", min=18, max=65), "65", True),
    (allow(field="f", op="range", min=18, max=65), "65.0001", False),
    (allow(field="f", op="range", min=18, max=65), "17.999", False),
    (allow(field="f", op="range", min="0.1", max="0.3"), "0.3", True),  # no float error
    (allow(field="f", op="range", min="0.1", max="0.3"), "0.30000000000000004", False),
    (allow(field="f", op="range", min=1000), "1e6", True),
    (allow(field="f", op="range", min=1000), "999", False),
    (allow(field="f", op="range", max="-1"), "-1.5", True),
    (allow(field="f", op="range", max="-1"), "0", False),
    (allow(field="f", op="range", min=0), "abc", False),
    (allow(field="f", op="range", min=0), "NaN", False),
    (allow(field="f", op="range", min=0), "1_000", False),
    (allow(field="f", op="range", min=0, max=10), " 5 ", True),
    # states
    (allow(field="f", op="states", values=["CA", "ny"]), "CA", True),
    (allow(field="f", op="states", values=["CA", "ny"]), "ny", True),
    (allow(field="f", op="states", values=["CA", "ny"]), "NY", True),
    (allow(field="f", op="states", values=["CA", "ny"]), "TX", False),
    (allow(field="f", op="states", values=["CA", "ny"]), "California", False),
    # zips: 5-digit exact, 3-digit prefix
    (allow(field="f", op="zips", values=["02134", "100"]), "02134", True),
    (allow(field="f", op="zips", values=["02134", "100"]), "02134-1234", True),
    (allow(field="f", op="zips", values=["02134", "100"]), "02135", False),
    (allow(field="f", op="zips", values=["02134", "100"]), "10001", True),
    (allow(field="f", op="zips", values=["02134", "100"]), "10099-0001", True),
    (allow(field="f", op="zips", values=["02134", "100"]), "11001", False),
    (allow(field="f", op="zips", values=["02134", "100"]), "100", False),  # not a ZIP
    (allow(field="f", op="zips", values=["02134", "100"]), "1001", False),
    (allow(field="f", op="zips", values=["02134", "100"]), "021345", False),
    (allow(field="f", op="zips", values=["02134", "100"]), "x10001", False),
]


@pytest.mark.parametrize(("spec", "value", "expected"), CASES)
def test_allow(spec: Filter, value: str, expected: bool) -> None:
    assert BuyerFilter([spec]).matches({"f": value}) is expected


@pytest.mark.parametrize(("spec", "value", "expected"), CASES)
def test_block_inverts_allow(spec: Filter, value: str, expected: bool) -> None:
    inverted = Filter(**{**_as_dict(spec), "action": "block"})
    assert BuyerFilter([inverted]).matches({"f": value}) is not expected


def _as_dict(spec: Filter) -> dict[str, object]:
    return {name: getattr(spec, name) for name in spec.__struct_fields__}


@pytest.mark.parametrize(
    "spec",
    [
        Filter(field="f", values=["a"]),
        Filter(field="f", op="regex", pattern="."),
        Filter(field="f", op="range", min=0),
        Filter(field="f", op="states", values=["CA"]),
        Filter(field="f", op="zips", values=["100"]),
    ],
)
@pytest.mark.parametrize("lead", [{}, {"f": ""}, {"other": "CA"}])
def test_missing_field_fails_allow_and_passes_block(spec: Filter, lead: dict[str, str]) -> None:
    assert BuyerFilter([spec]).matches(lead) is False
    blocked = Filter(**{**_as_dict(spec), "action": "block"})
    assert BuyerFilter([blocked]).matches(lead) is True


def test_all_filters_must_pass() -> None:
    buyer = BuyerFilter(
        [
            allow(field="state", op="states", values=["CA", "NY"]),
            block(field="zip", op="zips", values=["100"]),
            allow(field="amount", op="range", min=1000, max="50000"),
            block(field="email", op="regex", pattern=r"@(?:mailinator|example)\."),
        ]
    )
    good = {"state": "NY", "zip": "11201", "amount": "1500.5", "email": "a@b.com"}
    assert buyer.matches(good)
    assert buyer.describe_failure(good) is None
    assert buyer.matches({**good, "email": ""})  # missing passes a block filter
    for change in (
        {"state": "TX"},
        {"zip": "10001"},
        {"amount": "999.99"},
        {"amount": "lots"},
        {"email": "x@mailinator.com"},
    ):
        assert not buyer.matches({**good, **change}), change
    lead = {k: v for k, v in good.items() if k != "amount"}
    assert not buyer.matches(lead)


def test_no_filters_match_everything() -> None:
    buyer = BuyerFilter([])
    assert len(buyer) == 0
    assert buyer.matches({})
    assert buyer.describe_failure({"a": "b"}) is None


@pytest.mark.parametrize(
    ("spec", "lead", "reason"),
    [
        (
            allow(field="state", op="states", values=["CA"]),
            {},
            "state: missing (must be in states [CA])",
        ),
        (
            allow(field="state", op="states", values=["CA"]),
            {"state": "TX"},
            "state: 'TX' is not in states [CA]",
        ),
        (
            block(field="state", op="states", values=["CA"]),
            {"state": "CA"},
            "state: 'CA' is in states [CA] (blocked)",
        ),
        (
            allow(field="n", op="range", min=1, max="2.5"),
            {"n": "3"},
            "n: '3' is not in range [1, 2.5]",
        ),
        (allow(field="n", op="range", min=1), {"n": "0"}, "n: '0' is not in range [1, ]"),
        (allow(field="e", op="regex", pattern="^a"), {"e": "b"}, "e: 'b' is not matching '^a'"),
        (
            allow(field="z", op="zips", values=["100", "02134"]),
            {"z": "9"},
            "z: '9' is not in ZIPs [100, 02134]",
        ),
        (
            allow(field="c", values=list("abcdefg")),
            {"c": "z"},
            "c: 'z' is not in [a, b, c, d, e, ...]",
        ),
        (allow(field="t", values=["x"]), {"t": "y" * 100}, f"t: '{'y' * 37}...' is not in [x]"),
    ],
)
def test_describe_failure(spec: Filter, lead: dict[str, str], reason: str) -> None:
    buyer = BuyerFilter([spec])
    assert not buyer.matches(lead)
    assert buyer.describe_failure(lead) == reason


def test_describe_failure_names_the_first_failing_filter() -> None:
    buyer = BuyerFilter(
        [allow(field="a", values=["x"]), allow(field="b", values=["x"])],
    )
    assert buyer.describe_failure({"a": "x", "b": "y"}) == "b: 'y' is not in [x]"
    assert buyer.describe_failure({"a": "y", "b": "y"}) == "a: 'y' is not in [x]"


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        (allow(field="f", op="regex", pattern="("), "filters[0].pattern", "invalid regex"),
        (allow(field="f", op="regex", pattern="[z-a]"), "filters[0].pattern", "invalid regex"),
        (allow(field="f", op="regex"), "filters[0].pattern", "needs a pattern"),
        (allow(field="f", op="regex", pattern=""), "filters[0].pattern", "needs a pattern"),
        (allow(field="f", op="range"), "filters[0]", "needs min or max"),
        (allow(field="f", op="range", min="x"), "filters[0].min", "not a decimal"),
        (allow(field="f", op="range", max="1e"), "filters[0].max", "not a decimal"),
        (allow(field="f", op="range", min="NaN"), "filters[0].min", "not a decimal"),
        (allow(field="f", op="range", min=5, max=4), "filters[0].min", "greater than max"),
        (allow(field="f"), "filters[0].values", "needs values"),
        (allow(field="f", op="states"), "filters[0].values", "needs values"),
        (allow(field="f", op="zips"), "filters[0].values", "needs values"),
        (
            allow(field="f", op="states", values=["CA", "XX"]),
            "filters[0].values[1]",
            "unknown state",
        ),
        (
            allow(field="f", op="states", values=["California"]),
            "filters[0].values[0]",
            "unknown state",
        ),
        (allow(field="f", op="zips", values=["1234"]), "filters[0].values[0]", "3-digit prefix"),
        (allow(field="f", op="zips", values=["12345-6789"]), "filters[0].values[0]", "3-digit"),
        (allow(field="f", op="zips", values=["abcde"]), "filters[0].values[0]", "3-digit"),
    ],
)
def test_bad_config_raises_config_error(spec: Filter, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        BuyerFilter([spec], source="buyers.toml")
    assert (info.value.source, info.value.path) == ("buyers.toml", path)
    assert reason in info.value.reason


def test_config_error_path_prefix_and_index() -> None:
    specs = [allow(field="a", values=["x"]), allow(field="b", op="regex", pattern="(")]
    with pytest.raises(ConfigError, match=re.escape("c.toml: buyers[3].filters[1].pattern: ")):
        BuyerFilter(specs, source="c.toml", path_prefix="buyers[3].filters")


def test_every_state_code_is_accepted() -> None:
    buyer = BuyerFilter([allow(field="s", op="states", values=list(STATES))])
    assert all(buyer.matches({"s": code}) for code in STATES)
    assert not buyer.matches({"s": "AE"})


# --- property: block is the exact negation of allow for a present value ----------------

_FILTERS = st.one_of(
    st.builds(
        lambda vs: Filter(field="f", values=vs),
        st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4),
    ),
    st.builds(
        lambda lo, hi: Filter(field="f", op="range", min=str(min(lo, hi)), max=str(max(lo, hi))),
        st.decimals(allow_nan=False, allow_infinity=False, places=2),
        st.decimals(allow_nan=False, allow_infinity=False, places=2),
    ),
    st.builds(
        lambda vs: Filter(field="f", op="states", values=vs),
        st.lists(st.sampled_from(sorted(STATES)), min_size=1, max_size=5),
    ),
    st.builds(
        lambda vs: Filter(field="f", op="zips", values=vs),
        st.lists(st.from_regex(r"\A[0-9]{3}([0-9]{2})?\Z"), min_size=1, max_size=5),
    ),
)
_VALUES = st.one_of(
    st.text(min_size=1, max_size=12),
    st.from_regex(r"\A[0-9]{5}(-[0-9]{4})?\Z"),
    st.sampled_from(sorted(STATES)),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
)


@given(_FILTERS, _VALUES)
def test_block_is_negation_of_allow(spec: Filter, value: str) -> None:
    allowed = BuyerFilter([spec])
    blocked = BuyerFilter([Filter(**{**_as_dict(spec), "action": "block"})])
    assert allowed.matches({"f": value}) != blocked.matches({"f": value})
    assert (allowed.describe_failure({"f": value}) is None) == allowed.matches({"f": value})
    assert (blocked.describe_failure({"f": value}) is None) == blocked.matches({"f": value})


@given(st.lists(st.from_regex(r"\A[0-9]{5}\Z"), min_size=1, max_size=5), st.data())
def test_zip_prefix_matches_its_fives(fives: list[str], data: st.DataObject) -> None:
    zip5 = data.draw(st.sampled_from(fives))
    prefixes = BuyerFilter([Filter(field="z", op="zips", values=[z[:3] for z in fives])])
    exact = BuyerFilter([Filter(field="z", op="zips", values=fives)])
    assert exact.matches({"z": zip5}) and prefixes.matches({"z": zip5})
    assert prefixes.matches({"z": zip5 + "-0000"})


def test_regex_filters_run_in_linear_time_on_seller_input() -> None:
    """A pattern that backtracks exponentially under ``re`` (about 0.6 s at 24 characters,
    minutes at 40) answers at once: filters use RE2."""
    f = BuyerFilter([Filter(field="f", op="regex", pattern=r"^([a-z]+\s?)+$")])
    assert f.matches({"f": "a" * 5_000 + "!"}) is False  # would never return under re
    assert f.matches({"f": "abc def"}) is True


@pytest.mark.parametrize("pattern", [r"(\w)\1", r"foo(?=bar)", "(a"])
def test_regex_filters_outside_re2_fail_the_load(pattern: str) -> None:
    with pytest.raises(ConfigError, match="invalid regex"):
        BuyerFilter([Filter(field="f", op="regex", pattern=pattern)])
