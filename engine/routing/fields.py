"""Campaign field validation and normalization (pure, hot path).

A :class:`CampaignSchema` is compiled once from a campaign's ``list[config.Field]``;
:meth:`CampaignSchema.validate` then turns one raw lead (JSON or form input) into normalized
``str`` values plus *every* :class:`FieldError` found. Nothing here does I/O or logging, and
every regex, set and lookup table is built at import or construction time.

Input rules shared by every type:

* A raw value may be ``str``, ``int``, ``float``, ``bool`` or ``None``; anything else (lists,
  dicts, ...) is ``invalid_type``. ``int``/``float`` are read through ``str()``.
* Strings are stripped first. ``None`` and an empty (or all-whitespace) string count as
  *missing*: an error only when the field is ``required``; a missing field is left out of the
  normalized output, as is a field with an error. Keys not in the schema are ignored.
* A JSON ``bool`` is only meaningful for ``bool`` fields; a ``number`` field reports
  ``invalid_number`` and every other type ``invalid_type``.
* ``max_length`` (default 255) bounds the stripped input of every type except ``url``,
  which has a fixed 2048-character limit because real URLs are routinely longer than 255.

Error codes:

=================  =================================================================
code               meaning
=================  =================================================================
``required``       a required field is missing (absent, ``None`` or blank)
``invalid_type``   the raw value is a list/dict/other object, or a bool for a non-bool
                   non-number field
``too_long``       longer than ``max_length`` (url: 2048); for numbers also when the
                   canonical form would be longer
``invalid_text``   text contains a control character other than tab
``invalid_number`` not a finite decimal number (NaN, infinity and booleans included)
``out_of_range``   number below ``min`` or above ``max``
``invalid_email``  not a plausible e-mail address (see :func:`_email`)
``invalid_phone``  not a 10-digit NANP number with valid area code and exchange
``invalid_state``  not a US state, DC or inhabited-territory code or name
``invalid_zip``    not ``12345`` or ``12345-6789``
``not_allowed``    a ``list`` value that is not one of the configured ``values``
``invalid_date``   a dob that is unparseable, not a real date, in the future or < 1900
``too_young``      dob age (whole years at ``today``) below ``min_age``
``too_old``        dob age above ``max_age``
``invalid_ip``     not an IPv4/IPv6 address
``invalid_url``    not an absolute http(s) URL with a host, or contains whitespace
``invalid_bool``   not one of true/false/yes/no/1/0/on/off
=================  =================================================================

Normalized forms: text stripped; number canonical plain decimal (``"1500.5"``, ``"-3"``,
``"0"``; never an exponent); email lowercased; phone 10 digits; state 2-letter upper-case
code; zip 5 digits; list the configured spelling; dob ISO ``YYYY-MM-DD``; ip compressed
(``"2001:db8::1"``); url as given (only stripped, so tracking links round-trip exactly);
bool ``"true"``/``"false"``. Normalizing a normalized value yields itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec

from engine.core.config import Field
from engine.core.email import normalize_email
from engine.core.errors import ConfigError

__all__ = ["STATES", "CampaignSchema", "FieldError", "parse_decimal", "state_code"]


class FieldError(msgspec.Struct, frozen=True):
    """One problem with one field of a lead; ``code`` is one of the table above."""

    field: str
    code: str
    message: str


# --- lookup tables -------------------------------------------------------------------------

#: USPS codes of the 50 states, DC and the five inhabited territories. Military (AA/AE/AP)
#: and freely associated states (FM/MH/PW) are deliberately absent: they are not states.
STATES: Mapping[str, str] = {
    "AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California",
    "CO": "Colorado", "CT": "Connecticut", "DE": "Delaware", "FL": "Florida",
    "GA": "Georgia", "HI": "Hawaii", "ID": "Idaho", "IL": "Illinois", "IN": "Indiana",
    "IA": "Iowa", "KS": "Kansas", "KY": "Kentucky", "LA": "Louisiana", "ME": "Maine",
    "MD": "Maryland", "MA": "Massachusetts", "MI": "Michigan", "MN": "Minnesota",
    "MS": "Mississippi", "MO": "Missouri", "MT": "Montana", "NE": "Nebraska", "NV": "Nevada",
    "NH": "New Hampshire", "NJ": "New Jersey", "NM": "New Mexico", "NY": "New York",
    "NC": "North Carolina", "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma",
    "OR": "Oregon", "PA": "Pennsylvania", "RI": "Rhode Island", "SC": "South Carolina",
    "SD": "South Dakota", "TN": "Tennessee", "TX": "Texas", "UT": "Utah", "VT": "Vermont",
    "VA": "Virginia", "WA": "Washington", "WV": "West Virginia", "WI": "Wisconsin",
    "WY": "Wyoming", "DC": "District of Columbia", "AS": "American Samoa", "GU": "Guam",
    "MP": "Northern Mariana Islands", "PR": "Puerto Rico", "VI": "U.S. Virgin Islands",
}  # fmt: skip

# Full names (case- and whitespace-insensitive) map to codes too; a few common variants.
_STATE_LOOKUP: dict[str, str] = {
    **{code: code for code in STATES},
    **{name.upper(): code for code, name in STATES.items()},
    "VIRGIN ISLANDS": "VI",
    "US VIRGIN ISLANDS": "VI",
    "WASHINGTON DC": "DC",
    "WASHINGTON D.C.": "DC",
}
_SPACES = re.compile(r"\s+")

_BOOLS = {
    "true": "true", "yes": "true", "1": "true", "on": "true",
    "false": "false", "no": "false", "0": "false", "off": "false",
}  # fmt: skip

# Control characters (C0 without tab, DEL, C1) are never legitimate in a lead's text and
# break CSV exports and webhook templates downstream.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # all but tab
_WHITESPACE = re.compile(r"\s")
# Decimal() alone also takes "1_000", "NaN", "Infinity" and non-ASCII digits: gate it.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Separators people type in phone numbers; everything else (letters, "x123") is invalid.
_PHONE_PUNCT = str.maketrans("", "", " \t-.()/")
_NANP = re.compile(r"(?:\+?1)?([2-9][0-9]{2}[2-9][0-9]{6})", re.ASCII)
_ZIP = re.compile(r"([0-9]{5})(?:-[0-9]{4})?", re.ASCII)
_ISO_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII)
_US_DATE = re.compile(r"([0-9]{1,2})/([0-9]{1,2})/([0-9]{4})", re.ASCII)
_MIN_DOB = datetime.date(1900, 1, 1)
_URL_MAX = 2048


class _Invalid(Exception):
    """Raised by a normalizer; turned into a FieldError by validate (errors are the rare
    path, so the valid path pays nothing for them)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# --- shared helpers (also used by engine.routing.filters) ----------------------------------------


def parse_decimal(text: str) -> Decimal | None:
    """A finite Decimal from plain decimal text (``"12"``, ``"-1.5"``, ``"1e3"``), else None."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # unreachable after the regex; kept so bad input never raises
        return None


def state_code(text: str) -> str | None:
    """The 2-letter code of a state code or full name (any case), else None."""
    return _STATE_LOOKUP.get(_SPACES.sub(" ", text.strip()).upper())


def _canonical(value: Decimal) -> str:
    """Plain decimal text without exponent or trailing fractional zeros; ``-0`` is ``0``."""
    text = format(value, "f")  # exact: formatting never rounds, unlike normalize()
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# --- normalizers: (stripped text, today) -> normalized text, or raise _Invalid ------------

Normalizer = Callable[[str, datetime.date], str]


def _text(text: str, today: datetime.date) -> str:
    # max_length was already checked by validate(), which does it for every type
    if CONTROL_CHARS.search(text):
        raise _Invalid("invalid_text", "must not contain control characters")
    return text


def _number(minimum: Decimal | None, maximum: Decimal | None, max_length: int) -> Normalizer:
    def check(text: str, today: datetime.date) -> str:
        value = parse_decimal(text)
        if value is None:
            raise _Invalid("invalid_number", "must be a number")
        # "1e999999" is short but its plain form is not: bound it before formatting. The
        # digits themselves are bounded by the input length, already checked by validate().
        if value and not -max_length < value.adjusted() < max_length:
            raise _Invalid("too_long", f"must be at most {max_length} characters")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise _Invalid("out_of_range", _range_message(minimum, maximum))
        result = _canonical(value)
        if len(result) > max_length:
            raise _Invalid("too_long", f"must be at most {max_length} characters")
        return result

    return check


def _range_message(minimum: Decimal | None, maximum: Decimal | None) -> str:
    if minimum is not None and maximum is not None:
        return f"must be between {_canonical(minimum)} and {_canonical(maximum)}"
    if minimum is not None:
        return f"must be at least {_canonical(minimum)}"
    return f"must be at most {_canonical(maximum)}" if maximum is not None else "out of range"


def _email(text: str, today: datetime.date) -> str:
    """Pragmatic check: one @, dot-atom local part <= 64, LDH domain labels with a dot and an
    alphabetic TLD, <= 254 total. Quoted local parts, IP literals and raw IDNs are refused
    (engine.core.email, the portal logins' rule too)."""
    value = normalize_email(text)
    if value is None:
        raise _Invalid("invalid_email", "must be a valid email address")
    return value


def _phone(text: str, today: datetime.date) -> str:
    match = _NANP.fullmatch(text.translate(_PHONE_PUNCT))
    if match is None:
        raise _Invalid("invalid_phone", "must be a 10-digit US phone number")
    return match.group(1)


def _state(text: str, today: datetime.date) -> str:
    code = _STATE_LOOKUP.get(text.upper())
    if code is None:
        code = state_code(text)  # slow path only for names with odd spacing
        if code is None:
            raise _Invalid("invalid_state", "must be a US state code")
    return code


def _zip(text: str, today: datetime.date) -> str:
    match = _ZIP.fullmatch(text)
    if match is None:
        raise _Invalid("invalid_zip", "must be a 5-digit ZIP code")
    return match.group(1)


def _choice(values: Sequence[str]) -> Normalizer:
    # first spelling wins if the config lists the same value twice in different cases
    table: dict[str, str] = {}
    for value in reversed(values):
        table[value.strip().casefold()] = value.strip()
    allowed = ", ".join(values)

    def check(text: str, today: datetime.date) -> str:
        found = table.get(text.casefold())
        if found is None:
            raise _Invalid("not_allowed", f"must be one of: {allowed}")
        return found

    return check


def _dob(min_age: int | None, max_age: int | None) -> Normalizer:
    def check(text: str, today: datetime.date) -> str:
        born = _parse_date(text)
        if born is None or born > today or born < _MIN_DOB:
            raise _Invalid("invalid_date", "must be a past date as YYYY-MM-DD or MM/DD/YYYY")
        age = _age(born, today)
        if min_age is not None and age < min_age:
            raise _Invalid("too_young", f"must be at least {min_age} years old")
        if max_age is not None and age > max_age:
            raise _Invalid("too_old", f"must be at most {max_age} years old")
        return born.isoformat()

    return check


def _parse_date(text: str) -> datetime.date | None:
    try:
        if _ISO_DATE.fullmatch(text) is not None:  # what fromisoformat reads, in C
            return datetime.date.fromisoformat(text)
        match = _US_DATE.fullmatch(text)
        if match is None:
            return None
        month, day, year = match.groups()
        return datetime.date(int(year), int(month), int(day))
    except ValueError:  # 2023-02-29, 13/01/2000, ...
        return None


def _age(born: datetime.date, today: datetime.date) -> int:
    """Whole years. A Feb 29 birthday is reached on Mar 1 in common years (the usual US rule)."""
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _ip(text: str, today: datetime.date) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid("invalid_ip", "must be an IPv4 or IPv6 address") from None
    # Python < 3.13 prints IPv4-mapped addresses in hex ("::ffff:c000:201"), 3.13+ dotted;
    # pin the RFC 5952 dotted form so dedupe keys do not change with the interpreter.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped and not address.scope_id:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _url(text: str, today: datetime.date) -> str:
    # length (2048) was checked by validate(). urlsplit silently drops tabs and newlines
    # and tolerates spaces, so refuse them first.
    if _WHITESPACE.search(text) or CONTROL_CHARS.search(text):
        raise _Invalid("invalid_url", "must not contain whitespace")
    try:
        parts = urlsplit(text)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise _Invalid("invalid_url", "must be a valid http(s) URL") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise _Invalid("invalid_url", "must be an http(s) URL with a host")
    return text


def _bool(text: str, today: datetime.date) -> str:
    value = _BOOLS.get(text.lower())
    if value is None:
        raise _Invalid("invalid_bool", "must be true or false")
    return value


# --- the schema ----------------------------------------------------------------------------


class _Rule(NamedTuple):
    name: str
    type: str
    required: bool
    max_length: int
    normalize: Normalizer
    # the valid texts seen and their normal forms, for the types whose normal form
    # depends on the text alone and that repeat from lead to lead (None: not kept)
    memo: dict[str, str] | None


_MEMO_TYPES = frozenset({"number", "state", "bool", "list"})
_MEMO_MAX = 1024  # texts per field; then it starts again


class CampaignSchema:
    """A campaign's fields compiled for validation; build once, call :meth:`validate` a lot."""

    __slots__ = ("_rules", "names")

    def __init__(
        self, fields: Sequence[Field], *, source: str = "<config>", path_prefix: str = "fields"
    ) -> None:
        rules: list[_Rule] = []
        seen: set[str] = set()
        for index, field in enumerate(fields):
            path = f"{path_prefix}[{index}]"
            if field.name in seen:
                raise ConfigError(source, f"{path}.name", f"duplicate field {field.name!r}")
            seen.add(field.name)
            rules.append(_compile(field, source, path))
        self._rules = tuple(rules)
        self.names: tuple[str, ...] = tuple(rule.name for rule in rules)

    def validate(
        self, raw: Mapping[str, object], *, today: datetime.date
    ) -> tuple[dict[str, str], list[FieldError]]:
        """Normalized values of the schema's fields and every error found."""
        values: dict[str, str] = {}
        errors: list[FieldError] = []
        for name, kind, required, max_length, normalize, memo in self._rules:
            value = raw.get(name)
            if value is None:
                text = ""
            elif type(value) is str:
                text = value.strip()
            elif type(value) is int:  # a JSON integer, as _coerce reads it
                text = str(value)
            else:
                text_or_error = _coerce(value, name, kind)
                if isinstance(text_or_error, FieldError):
                    errors.append(text_or_error)
                    continue
                text = text_or_error
            if not text:
                if required:
                    errors.append(FieldError(name, "required", "is required"))
            elif len(text) > max_length:
                message = f"must be at most {max_length} characters"
                errors.append(FieldError(name, "too_long", message))
            elif memo is None:
                try:
                    values[name] = normalize(text, today)
                except _Invalid as exc:
                    errors.append(FieldError(name, exc.code, exc.message))
            else:
                known = memo.get(text)
                if known is not None:
                    values[name] = known
                    continue
                try:
                    values[name] = known = normalize(text, today)
                except _Invalid as exc:
                    errors.append(FieldError(name, exc.code, exc.message))
                    continue
                if len(memo) >= _MEMO_MAX:
                    memo.clear()
                memo[text] = known
        return values, errors


def _coerce(value: object, name: str, kind: str) -> str | FieldError:
    """Text of a non-str raw value (the slow path: JSON numbers and booleans)."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        if kind == "bool":
            return "true" if value else "false"
        if kind == "number":
            return FieldError(name, "invalid_number", "must be a number, not a boolean")
        return FieldError(name, "invalid_type", "must be a string, not a boolean")
    if isinstance(value, str):  # a str subclass
        return str(value).strip()
    if isinstance(value, int | float):
        # str(float) is the shortest round-trip text ("1500.5"); NaN/inf become "nan"/"inf"
        # and fail every type's check
        return str(value)
    message = f"must be a string or number, not {type(value).__name__}"
    return FieldError(name, "invalid_type", message)


def _compile(field: Field, source: str, path: str) -> _Rule:
    if field.max_length < 1:
        raise ConfigError(source, f"{path}.max_length", "must be at least 1")
    # url ignores max_length: its default (255) is shorter than many real URLs
    max_length = _URL_MAX if field.type == "url" else field.max_length
    return _Rule(
        field.name, field.type, field.required, max_length, _normalizer(field, source, path),
        {} if field.type in _MEMO_TYPES else None,
    )


def _normalizer(field: Field, source: str, path: str) -> Normalizer:
    kind = field.type
    if kind == "number":
        minimum = _config_decimal(field.min, source, f"{path}.min")
        maximum = _config_decimal(field.max, source, f"{path}.max")
        if minimum is not None and maximum is not None and minimum > maximum:
            raise ConfigError(source, f"{path}.min", "min is greater than max")
        return _number(minimum, maximum, field.max_length)
    if kind == "list":
        if not field.values:
            raise ConfigError(source, f"{path}.values", "a list field needs values")
        return _choice(field.values)
    if kind == "dob":
        for name, age in (("min_age", field.min_age), ("max_age", field.max_age)):
            if age is not None and not 0 <= age <= 150:
                raise ConfigError(source, f"{path}.{name}", "must be between 0 and 150")
        if (
            field.min_age is not None
            and field.max_age is not None
            and field.min_age > field.max_age
        ):
            raise ConfigError(source, f"{path}.min_age", "min_age is greater than max_age")
        return _dob(field.min_age, field.max_age)
    return _SIMPLE[kind]


_SIMPLE: dict[str, Normalizer] = {
    "text": _text,
    "email": _email,
    "phone": _phone,
    "state": _state,
    "zip": _zip,
    "ip": _ip,
    "url": _url,
    "bool": _bool,
}


def _config_decimal(value: int | str | None, source: str, path: str) -> Decimal | None:
    """A config bound (int or decimal string) as Decimal; ConfigError if it is not one."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(source, path, "must be a number")
    parsed = Decimal(value) if isinstance(value, int) else parse_decimal(value)
    if parsed is None:
        raise ConfigError(source, path, f"{value!r} is not a decimal number")
    return parsed
