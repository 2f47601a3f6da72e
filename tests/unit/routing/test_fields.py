"""engine.routing.fields: every type, every error code, normalization and edge cases."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.config import Field, FieldType
from engine.core.errors import ConfigError
from engine.routing.fields import STATES, CampaignSchema, FieldError, parse_decimal, state_code

TODAY = datetime.date(2026, 3, 15)


def one(field: Field, value: object, today: datetime.date = TODAY) -> str | FieldError:
    """The normalized value or the single error of a one-field schema."""
    values, errors = CampaignSchema([field]).validate({field.name: value}, today=today)
    if errors:
        assert len(errors) == 1 and not values
        return errors[0]
    return values[field.name]


def code_of(field: Field, value: object, today: datetime.date = TODAY) -> str:
    result = one(field, value, today)
    assert isinstance(result, FieldError), f"{value!r} unexpectedly normalized to {result!r}"
    assert result.field == field.name and result.message
    return result.code


LONG_EMAIL = "a@" + ("b" * 63 + ".") * 3 + "c" * 56 + ".com"  # 254 characters, the limit
assert len(LONG_EMAIL) == 254

# --- normalization tables --------------------------------------------------------------

VALID: list[tuple[Field, object, str]] = [
    # text
    (Field(name="f"), "  hello  ", "hello"),
    (Field(name="f"), "a\tb", "a\tb"),
    (Field(name="f"), "caf\u00e9 \u2603", "caf\u00e9 \u2603"),
    (Field(name="f"), 42, "42"),
    (Field(name="f"), 1.5, "1.5"),
    (Field(name="f", max_length=3), " abc ", "abc"),
    # number
    (Field(name="f", type="number"), "1500.50", "1500.5"),
    (Field(name="f", type="number"), 1500.5, "1500.5"),
    (Field(name="f", type="number"), 1500, "1500"),
    (Field(name="f", type="number"), "1e3", "1000"),
    (Field(name="f", type="number"), "1.5E-3", "0.0015"),
    (Field(name="f", type="number"), 1e20, "100000000000000000000"),
    (Field(name="f", type="number"), "+7", "7"),
    (Field(name="f", type="number"), "-0.00", "0"),
    (Field(name="f", type="number"), ".5", "0.5"),
    (Field(name="f", type="number"), "5.", "5"),
    (Field(name="f", type="number"), "007", "7"),
    (Field(name="f", type="number"), "100.000", "100"),
    (
        Field(name="f", type="number"),
        "0.1000000000000000000000000000001",
        "0.1000000000000000000000000000001",
    ),
    (Field(name="f", type="number", min=0, max="2000"), "2000.00", "2000"),
    (Field(name="f", type="number", min=0, max="2000"), 0, "0"),
    (Field(name="f", type="number", min="-1.5"), "-1.5", "-1.5"),
    # email
    (Field(name="f", type="email"), " John.Doe+tag@Example.COM ", "john.doe+tag@example.com"),
    (Field(name="f", type="email"), "a@b.co", "a@b.co"),
    (
        Field(name="f", type="email"),
        "x_y@mail.sub-domain.example.org",
        "x_y@mail.sub-domain.example.org",
    ),
    (Field(name="f", type="email"), "o'neil@example.ie", "o'neil@example.ie"),
    (Field(name="f", type="email"), "a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    (Field(name="f", type="email"), LONG_EMAIL, LONG_EMAIL),
    # phone
    (Field(name="f", type="phone"), "(212) 555-1234", "2125551234"),
    (Field(name="f", type="phone"), "212.555.1234", "2125551234"),
    (Field(name="f", type="phone"), "+1 212 555 1234", "2125551234"),
    (Field(name="f", type="phone"), "1-212-555-1234", "2125551234"),
    (Field(name="f", type="phone"), "12125551234", "2125551234"),
    (Field(name="f", type="phone"), 2125551234, "2125551234"),
    (Field(name="f", type="phone"), "212/555-1234", "2125551234"),
    # state
    (Field(name="f", type="state"), "ny", "NY"),
    (Field(name="f", type="state"), " Ca ", "CA"),
    (Field(name="f", type="state"), "dc", "DC"),
    (Field(name="f", type="state"), "PR", "PR"),
    (Field(name="f", type="state"), "gu", "GU"),
    (Field(name="f", type="state"), "New York", "NY"),
    (Field(name="f", type="state"), "new   hampshire", "NH"),
    (Field(name="f", type="state"), "District of Columbia", "DC"),
    (Field(name="f", type="state"), "Washington DC", "DC"),
    (Field(name="f", type="state"), "washington", "WA"),
    # zip
    (Field(name="f", type="zip"), "02134", "02134"),
    (Field(name="f", type="zip"), "02134-1234", "02134"),
    (Field(name="f", type="zip"), 90210, "90210"),
    # list
    (Field(name="f", type="list", values=["Own", "Rent"]), "own", "Own"),
    (Field(name="f", type="list", values=["Own", "Rent"]), " RENT ", "Rent"),
    (Field(name="f", type="list", values=["Own", "own"]), "OWN", "Own"),
    (Field(name="f", type="list", values=["1", "2"]), 2, "2"),
    # dob
    (Field(name="f", type="dob"), "1990-07-04", "1990-07-04"),
    (Field(name="f", type="dob"), "07/04/1990", "1990-07-04"),
    (Field(name="f", type="dob"), "7/4/1990", "1990-07-04"),
    (Field(name="f", type="dob"), "2000-02-29", "2000-02-29"),
    (Field(name="f", type="dob"), "1900-01-01", "1900-01-01"),
    (Field(name="f", type="dob"), TODAY.isoformat(), TODAY.isoformat()),
    (Field(name="f", type="dob", min_age=18), "2008-03-15", "2008-03-15"),  # 18 today
    (Field(name="f", type="dob", max_age=65), "1960-03-16", "1960-03-16"),  # 65 until tomorrow
    # ip
    (Field(name="f", type="ip"), "192.168.0.1", "192.168.0.1"),
    (Field(name="f", type="ip"), "2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    (Field(name="f", type="ip"), "2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
    (Field(name="f", type="ip"), "::FFFF:192.0.2.1", "::ffff:192.0.2.1"),
    (Field(name="f", type="ip"), "0:0:0:0:0:ffff:c000:0201", "::ffff:192.0.2.1"),
    (Field(name="f", type="ip"), "::", "::"),
    (Field(name="f", type="ip"), "fe80::1%eth0", "fe80::1%eth0"),
    # url
    (Field(name="f", type="url"), " https://example.com/a?b=c#d ", "https://example.com/a?b=c#d"),
    (Field(name="f", type="url"), "HTTP://Example.com", "HTTP://Example.com"),
    (Field(name="f", type="url"), "http://[::1]:8080/x", "http://[::1]:8080/x"),
    (Field(name="f", type="url"), "https://u:p@host.test:443/", "https://u:p@host.test:443/"),
    (Field(name="f", type="url"), "https://e.com/" + "a" * 2000, "https://e.com/" + "a" * 2000),
    # bool
    (Field(name="f", type="bool"), True, "true"),
    (Field(name="f", type="bool"), False, "false"),
    (Field(name="f", type="bool"), "YES", "true"),
    (Field(name="f", type="bool"), "no", "false"),
    (Field(name="f", type="bool"), "On", "true"),
    (Field(name="f", type="bool"), "off", "false"),
    (Field(name="f", type="bool"), "1", "true"),
    (Field(name="f", type="bool"), 0, "false"),
    (Field(name="f", type="bool"), " TRUE ", "true"),
]


@pytest.mark.parametrize(("field", "raw", "expected"), VALID)
def test_normalizes(field: Field, raw: object, expected: str) -> None:
    assert one(field, raw) == expected


@pytest.mark.parametrize(("field", "raw", "expected"), VALID)
def test_normalized_value_is_a_fixed_point(field: Field, raw: object, expected: str) -> None:
    assert one(field, expected) == expected


# --- error tables --------------------------------------------------------------------------

INVALID: list[tuple[Field, object, str]] = [
    # invalid_type
    (Field(name="f"), ["a"], "invalid_type"),
    (Field(name="f"), {"a": 1}, "invalid_type"),
    (Field(name="f"), b"bytes", "invalid_type"),
    (Field(name="f"), True, "invalid_type"),
    (Field(name="f", type="phone"), False, "invalid_type"),
    (Field(name="f", type="bool"), [True], "invalid_type"),
    # too_long
    (Field(name="f", max_length=3), "abcd", "too_long"),
    (Field(name="f"), "x" * 256, "too_long"),
    (Field(name="f", type="email"), "a" * 250 + "@b.com", "too_long"),
    (Field(name="f", type="url"), "https://e.com/" + "a" * 2035, "too_long"),
    (Field(name="f", type="number"), "1e300", "too_long"),
    (Field(name="f", type="number"), "1e-300", "too_long"),
    (Field(name="f", type="number", max_length=5), "1e5", "too_long"),
    # invalid_text
    (Field(name="f"), "a\nb", "invalid_text"),
    (Field(name="f"), "a\rb", "invalid_text"),
    (Field(name="f"), "a\x00b", "invalid_text"),
    (Field(name="f"), "a\x7fb", "invalid_text"),
    (Field(name="f"), "a\x85b", "invalid_text"),
    # invalid_number
    (Field(name="f", type="number"), "abc", "invalid_number"),
    (Field(name="f", type="number"), "1,000", "invalid_number"),
    (Field(name="f", type="number"), "1_000", "invalid_number"),
    (Field(name="f", type="number"), "NaN", "invalid_number"),
    (Field(name="f", type="number"), "Infinity", "invalid_number"),
    (Field(name="f", type="number"), "-inf", "invalid_number"),
    (Field(name="f", type="number"), float("nan"), "invalid_number"),
    (Field(name="f", type="number"), float("inf"), "invalid_number"),
    (Field(name="f", type="number"), True, "invalid_number"),
    (Field(name="f", type="number"), False, "invalid_number"),
    (Field(name="f", type="number"), "\u0661\u0662", "invalid_number"),  # Arabic-Indic digits
    (Field(name="f", type="number"), "1.2.3", "invalid_number"),
    (Field(name="f", type="number"), "$5", "invalid_number"),
    # out_of_range
    (Field(name="f", type="number", min=0, max="2000"), "2000.01", "out_of_range"),
    (Field(name="f", type="number", min=0, max="2000"), -1, "out_of_range"),
    (Field(name="f", type="number", min="0.5"), "0.49", "out_of_range"),
    (Field(name="f", type="number", max=10), 10.0001, "out_of_range"),
    # invalid_email
    (Field(name="f", type="email"), "plain", "invalid_email"),
    (Field(name="f", type="email"), "a@@b.com", "invalid_email"),
    (Field(name="f", type="email"), "a@b@c.com", "invalid_email"),
    (Field(name="f", type="email"), "@b.com", "invalid_email"),
    (Field(name="f", type="email"), "a@localhost", "invalid_email"),
    (Field(name="f", type="email"), "a@-b.com", "invalid_email"),
    (Field(name="f", type="email"), "a@b-.com", "invalid_email"),
    (Field(name="f", type="email"), "a@b.c", "invalid_email"),
    (Field(name="f", type="email"), "a@b.c0m", "invalid_email"),
    (Field(name="f", type="email"), "a@b..com", "invalid_email"),
    (Field(name="f", type="email"), "a@b_c.com", "invalid_email"),
    (Field(name="f", type="email"), ".a@b.com", "invalid_email"),
    (Field(name="f", type="email"), "a..b@b.com", "invalid_email"),
    (Field(name="f", type="email"), "a b@b.com", "invalid_email"),
    (Field(name="f", type="email"), "\u00fc@b.com", "invalid_email"),
    (Field(name="f", type="email"), "a" * 65 + "@example.com", "invalid_email"),
    (Field(name="f", type="email"), "a@" + "b" * 64 + ".com", "invalid_email"),  # label > 63
    (Field(name="f", type="email"), LONG_EMAIL + "x", "invalid_email"),  # 255 > 254
    (Field(name="f", type="email"), "a@[127.0.0.1]", "invalid_email"),
    # invalid_phone
    (Field(name="f", type="phone"), "555-1234", "invalid_phone"),
    (Field(name="f", type="phone"), "112-555-1234", "invalid_phone"),  # area code 1xx
    (Field(name="f", type="phone"), "012-555-1234", "invalid_phone"),
    (Field(name="f", type="phone"), "212-155-1234", "invalid_phone"),  # exchange 1xx
    (Field(name="f", type="phone"), "212-055-1234", "invalid_phone"),
    (Field(name="f", type="phone"), "+44 20 7946 0958", "invalid_phone"),
    (Field(name="f", type="phone"), "+2125551234", "invalid_phone"),
    (Field(name="f", type="phone"), "22125551234", "invalid_phone"),
    (Field(name="f", type="phone"), "212-555-1234 x12", "invalid_phone"),
    (Field(name="f", type="phone"), "212-555-12345", "invalid_phone"),
    (Field(name="f", type="phone"), "212-555-CALL", "invalid_phone"),
    (
        Field(name="f", type="phone"),
        "\uff12\uff11\uff12\uff15\uff15\uff15\uff11\uff12\uff13\uff14",
        "invalid_phone",
    ),
    (Field(name="f", type="phone"), 2125551234.0, "invalid_phone"),
    # invalid_state
    (Field(name="f", type="state"), "XX", "invalid_state"),
    (Field(name="f", type="state"), "N.Y.", "invalid_state"),
    (Field(name="f", type="state"), "AE", "invalid_state"),  # military, not a state
    (Field(name="f", type="state"), "Ontario", "invalid_state"),
    (Field(name="f", type="state"), "N", "invalid_state"),
    # invalid_zip
    (Field(name="f", type="zip"), "1234", "invalid_zip"),
    (Field(name="f", type="zip"), "123456", "invalid_zip"),
    (Field(name="f", type="zip"), "12345-678", "invalid_zip"),
    (Field(name="f", type="zip"), "123456789", "invalid_zip"),
    (Field(name="f", type="zip"), "ABCDE", "invalid_zip"),
    (Field(name="f", type="zip"), 2134, "invalid_zip"),  # JSON ints lose leading zeros
    (Field(name="f", type="zip"), "K1A 0B1", "invalid_zip"),
    # not_allowed
    (Field(name="f", type="list", values=["Own", "Rent"]), "Lease", "not_allowed"),
    (Field(name="f", type="list", values=["Own", "Rent"]), "Ow", "not_allowed"),
    # invalid_date
    (Field(name="f", type="dob"), "2023-02-29", "invalid_date"),
    (Field(name="f", type="dob"), "1990-13-01", "invalid_date"),
    (Field(name="f", type="dob"), "13/01/1990", "invalid_date"),
    (Field(name="f", type="dob"), "1990/07/04", "invalid_date"),
    (Field(name="f", type="dob"), "04-07-1990", "invalid_date"),
    (Field(name="f", type="dob"), "July 4 1990", "invalid_date"),
    (Field(name="f", type="dob"), "90-07-04", "invalid_date"),
    (Field(name="f", type="dob"), "2026-03-16", "invalid_date"),  # tomorrow
    (Field(name="f", type="dob"), "1899-12-31", "invalid_date"),
    (Field(name="f", type="dob"), 19900704, "invalid_date"),
    # too_young / too_old
    (Field(name="f", type="dob", min_age=18), "2008-03-16", "too_young"),  # 18 tomorrow
    (Field(name="f", type="dob", min_age=18), "03/16/2008", "too_young"),
    (Field(name="f", type="dob", max_age=65), "1960-03-15", "too_old"),  # 66 today
    (Field(name="f", type="dob", min_age=0, max_age=1), "2020-01-01", "too_old"),
    # invalid_ip
    (Field(name="f", type="ip"), "1.2.3", "invalid_ip"),
    (Field(name="f", type="ip"), "256.1.1.1", "invalid_ip"),
    (Field(name="f", type="ip"), "01.2.3.4", "invalid_ip"),
    (Field(name="f", type="ip"), "2001:db8::1::1", "invalid_ip"),
    (Field(name="f", type="ip"), "example.com", "invalid_ip"),
    (Field(name="f", type="ip"), 3232235777, "invalid_ip"),
    # invalid_url
    (Field(name="f", type="url"), "example.com", "invalid_url"),
    (Field(name="f", type="url"), "ftp://example.com/", "invalid_url"),
    (Field(name="f", type="url"), "javascript:alert(1)", "invalid_url"),
    (Field(name="f", type="url"), "https://", "invalid_url"),
    (Field(name="f", type="url"), "https:///path", "invalid_url"),
    (Field(name="f", type="url"), "https://exa mple.com", "invalid_url"),
    (Field(name="f", type="url"), "https://example.com/\tx", "invalid_url"),
    (Field(name="f", type="url"), "https://example.com:99999/", "invalid_url"),
    (Field(name="f", type="url"), "https://example.com:port/", "invalid_url"),
    (Field(name="f", type="url"), "http://[::1/", "invalid_url"),
    # invalid_bool
    (Field(name="f", type="bool"), "maybe", "invalid_bool"),
    (Field(name="f", type="bool"), "t", "invalid_bool"),
    (Field(name="f", type="bool"), 2, "invalid_bool"),
    (Field(name="f", type="bool"), 1.0, "invalid_bool"),
]


@pytest.mark.parametrize(("field", "raw", "code"), INVALID)
def test_rejects(field: Field, raw: object, code: str) -> None:
    assert code_of(field, raw) == code


ALL_TYPES: tuple[FieldType, ...] = (
    "text", "number", "email", "phone", "state", "zip", "list", "dob", "ip", "url", "bool",
)  # fmt: skip


def _field(kind: FieldType, **kw: object) -> Field:
    values = ["a"] if kind == "list" else []
    return Field(name="f", type=kind, values=values, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("raw", [None, "", "   ", " \t "])
def test_missing_required_is_an_error(kind: FieldType, raw: object) -> None:
    assert code_of(_field(kind, required=True), raw) == "required"


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("raw", [None, "", "   "])
def test_missing_optional_is_left_out(kind: FieldType, raw: object) -> None:
    assert CampaignSchema([_field(kind)]).validate({"f": raw}, today=TODAY) == ({}, [])


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_absent_required_key_is_an_error(kind: FieldType) -> None:
    values, errors = CampaignSchema([_field(kind, required=True)]).validate({}, today=TODAY)
    assert values == {}
    assert errors == [FieldError("f", "required", "is required")]


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("raw", [[], {}, ("x",), object()])
def test_containers_are_invalid_type(kind: FieldType, raw: object) -> None:
    assert code_of(_field(kind), raw) == "invalid_type"


def test_every_error_is_reported_and_unknown_keys_are_ignored() -> None:
    schema = CampaignSchema(
        [
            Field(name="email", type="email", required=True),
            Field(name="phone", type="phone", required=True),
            Field(name="zip", type="zip"),
            Field(name="state", type="state"),
            Field(name="first"),
        ]
    )
    values, errors = schema.validate(
        {"email": "nope", "zip": "1", "state": "tx", "first": " Ann ", "extra": [1], "x": None},
        today=TODAY,
    )
    assert values == {"state": "TX", "first": "Ann"}
    assert [(e.field, e.code) for e in errors] == [
        ("email", "invalid_email"),
        ("phone", "required"),
        ("zip", "invalid_zip"),
    ]


def test_names_and_field_order() -> None:
    schema = CampaignSchema([Field(name="b"), Field(name="a", type="zip")])
    assert schema.names == ("b", "a")
    assert CampaignSchema([]).names == ()
    assert CampaignSchema([]).validate({"a": 1}, today=TODAY) == ({}, [])


def test_str_subclass_is_accepted() -> None:
    class S(str):
        pass

    assert one(Field(name="f", type="state"), S(" ny ")) == "NY"


# --- dob: leap days and ages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("today", "code"),
    [
        (datetime.date(2026, 2, 28), "too_young"),  # Feb 29 birthday not yet reached
        (datetime.date(2026, 3, 1), None),  # reached on Mar 1 in a common year
        (datetime.date(2028, 2, 28), None),  # 20 by then anyway
    ],
)
def test_leap_day_birthday(today: datetime.date, code: str | None) -> None:
    field = Field(name="f", type="dob", min_age=18)
    result = one(field, "2008-02-29", today)
    if code is None:
        assert result == "2008-02-29"
    else:
        assert isinstance(result, FieldError) and result.code == code


def test_leap_day_birthday_in_a_leap_year() -> None:
    field = Field(name="f", type="dob", min_age=20)
    assert code_of(field, "02/29/2008", datetime.date(2028, 2, 28)) == "too_young"
    assert one(field, "02/29/2008", datetime.date(2028, 2, 29)) == "2008-02-29"


def test_age_messages_name_the_limit() -> None:
    result = one(Field(name="f", type="dob", min_age=21), "2010-01-01")
    assert result == FieldError("f", "too_young", "must be at least 21 years old")


def test_range_message_names_the_bounds() -> None:
    field = Field(name="f", type="number", min=1, max="99.50")
    assert one(field, "100") == FieldError("f", "out_of_range", "must be between 1 and 99.5")


# --- construction errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ([Field(name="a"), Field(name="a")], "fields[1].name"),
        ([Field(name="a", type="list")], "fields[0].values"),
        ([Field(name="a", type="number", min="x")], "fields[0].min"),
        ([Field(name="a", type="number", max="1e")], "fields[0].max"),
        ([Field(name="a", type="number", max="NaN")], "fields[0].max"),
        ([Field(name="a", type="number", min=5, max=1)], "fields[0].min"),
        ([Field(name="a", type="dob", min_age=30, max_age=20)], "fields[0].min_age"),
        ([Field(name="a", type="dob", min_age=-1)], "fields[0].min_age"),
        ([Field(name="a", type="dob", max_age=200)], "fields[0].max_age"),
        ([Field(name="a", max_length=0)], "fields[0].max_length"),
    ],
)
def test_bad_config_raises_config_error(fields: list[Field], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        CampaignSchema(fields, source="c.toml", path_prefix="fields")
    assert info.value.source == "c.toml"
    assert info.value.path == path


def test_config_error_path_prefix() -> None:
    with pytest.raises(ConfigError, match=r"campaigns\[2\]\.fields\[0\]\.values"):
        CampaignSchema([Field(name="a", type="list")], path_prefix="campaigns[2].fields")


# --- helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", "1"), (" -2.50 ", "-2.50"), ("1e3", "1E+3"), ("x", None), ("nan", None), ("", None)],
)
def test_parse_decimal(text: str, expected: str | None) -> None:
    result = parse_decimal(text)
    assert (None if result is None else str(result)) == expected


def test_state_tables() -> None:
    assert len(STATES) == 56  # 50 states, DC, 5 inhabited territories
    assert all(re.fullmatch(r"[A-Z]{2}", code) for code in STATES)
    for code, name in STATES.items():
        assert state_code(name.lower()) == code
        assert state_code(code.lower()) == code
    assert state_code("Atlantis") is None


def test_module_docstring_documents_every_code() -> None:
    import engine.routing.fields

    doc = engine.routing.fields.__doc__ or ""
    source = Path(engine.routing.fields.__file__).read_text()
    used = set(re.findall(r'_Invalid\("([a-z_]+)"', source))
    used |= set(re.findall(r'FieldError\(\s*name,\s*"([a-z_]+)"', source))
    assert used >= {"required", "too_long", "invalid_type", "invalid_number"}
    for code in used:
        assert f"``{code}``" in doc, code


# --- property: normalization is idempotent ---------------------------------------------

SCHEMA = CampaignSchema(
    [
        Field(name="text"),
        Field(name="number", type="number"),
        Field(name="email", type="email"),
        Field(name="phone", type="phone"),
        Field(name="state", type="state"),
        Field(name="zip", type="zip"),
        Field(name="list", type="list", values=["Own", "Rent", "Other"]),
        Field(name="dob", type="dob"),
        Field(name="ip", type="ip"),
        Field(name="url", type="url"),
        Field(name="bool", type="bool"),
    ]
)

_phone = st.builds(
    lambda prefix, a, b, c, sep: f"{prefix}{a}{sep}{b}{sep}{c}",
    st.sampled_from(["", "1", "+1", "+1 "]),
    st.from_regex(r"\A[2-9][0-9]{2}\Z"),
    st.from_regex(r"\A[2-9][0-9]{2}\Z"),
    st.from_regex(r"\A[0-9]{4}\Z"),
    st.sampled_from(["", "-", ".", " "]),
)
_any = st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.booleans(), st.none())
RAW = st.fixed_dictionaries(
    {},
    optional={
        "text": _any,
        "number": st.one_of(_any, st.decimals().map(str), st.floats(allow_nan=False)),
        "email": st.one_of(_any, st.emails()),
        "phone": st.one_of(_any, _phone),
        "state": st.one_of(_any, st.sampled_from([*STATES, *STATES.values()]).map(str.lower)),
        "zip": st.one_of(_any, st.from_regex(r"\A[0-9]{5}(-[0-9]{4})?\Z")),
        "list": st.one_of(_any, st.sampled_from(["own", "RENT", "other"])),
        "dob": st.one_of(
            _any, st.dates().map(str), st.dates().map(lambda d: d.strftime("%m/%d/%Y"))
        ),
        "ip": st.one_of(
            _any, st.ip_addresses().map(str), st.ip_addresses(v=6).map(lambda a: a.exploded)
        ),
        "url": st.one_of(
            _any, st.from_regex(r"\Ahttps?://[a-z]{1,10}\.[a-z]{2,5}(/[a-z0-9?=&]*)?\Z")
        ),
        "bool": st.one_of(_any, st.sampled_from(["Yes", "NO", "on", "Off", "1", "0"])),
    },
)


@given(RAW, st.dates(min_value=datetime.date(1950, 1, 1)))
def test_normalization_is_idempotent(raw: dict[str, object], today: datetime.date) -> None:
    values, errors = SCHEMA.validate(raw, today=today)
    assert set(values).isdisjoint(e.field for e in errors)
    assert all(isinstance(v, str) and v == v.strip() and v for v in values.values())
    again, errors_again = SCHEMA.validate(values, today=today)
    assert errors_again == []
    assert again == values
