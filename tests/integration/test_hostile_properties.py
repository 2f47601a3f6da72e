"""Seeded property tests (issue #14, "No 5xx a client did not earn"): hostile input against
one running engine, over real HTTP, on every endpoint it can reach. Each request is refused
with a 4xx (a batch: 200 with only client-error ERROR lines), and no Redis key is created,
changed or removed by it.

Each kind of hostile input is one :class:`Hostile` in :data:`HOSTILE`: a strategy of values
and the requests that carry one value to every place it applies. Another kind (header
sizes, ...) is one more entry there; the test runs each on its own, with its own examples.
"""

from __future__ import annotations

import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import SEED
from tests.helpers.harness import BASE_TOML, Engine, buyer, make_config, running

LEAD = {"lp_campaign_id": "camp", "lp_supplier_id": "s1", "lp_key": "key-s1",
        "email": "prop@example.com"}
METERED = BASE_TOML.replace('opening_balance = "1000.00"\n',
                            'opening_balance = "1000.00"\n[tenants.meters]\nsms = "0.25"\n', 1)
CAMPAIGN = """
[[campaigns]]
tenant = "t1"
id = "camp"
fields = [
  { name = "email", type = "email", required = true },
  { name = "bill", type = "number" },
  { name = "zip", type = "zip" },
  { name = "phone", type = "phone" },
  { name = "dob", type = "dob" },
]
"""
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Req:
    """One request; ``ctype`` None sends no Content-Type at all."""

    method: str
    path: str
    body: bytes | None = None
    ctype: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hostile:
    """A kind of hostile input: its values, and the requests carrying one of them."""

    name: str
    values: st.SearchStrategy[Any]
    requests: Callable[[Any], list[Req]]
    # the status a value must get, where it is certain (None: any refusal will do)
    status: Callable[[Any], int | None] = lambda _value: None


def _json(data: object) -> bytes:
    return msgspec.json.encode(data)


def _bad_key_line(n: int) -> bytes:
    """A batch line refused for another reason (wrong lp_key, 1011): nothing is decided."""
    return _json({**LEAD, "lp_key": "wrong", "email": f"other{n}@example.com"})


# --- (a) JSON nested up to 3,000 levels, arrays and objects mixed --------------------------

def _nest(levels: list[bool], where: str) -> bytes:
    """``levels``: True an array, False an object (``{"k": ...}``), outermost first; the
    nest alone, or as the value of a lead's field: ``email`` (required) and ``bill`` (a
    number) refuse it when it decodes, an unknown field ignores it, so that lead has a
    wrong ``lp_key``."""
    inner = b"".join(b"[" if a else b'{"k":' for a in levels) + b"0"
    inner += b"".join(b"]" if a else b"}" for a in reversed(levels))
    if where == "bare":
        return inner
    lead = {**LEAD, "lp_key": "wrong"} if where == "extra" else LEAD
    return _json(lead)[:-1] + b',"' + where.encode() + b'":' + inner + b"}"


deep_bodies = st.builds(
    lambda depth, pattern, where: _nest([pattern[i % len(pattern)] for i in range(depth)],
                                        where),
    st.one_of(st.integers(1, 3_000), st.integers(950, 1_050)),  # and around the limit
    st.lists(st.booleans(), min_size=1, max_size=6),
    st.sampled_from(["bare", "email", "bill", "extra"]),
)


def body_requests(body: bytes) -> list[Req]:
    """``body`` to every endpoint that reads a body."""
    return [
        Req("POST", "/v1/leads", body),
        Req("POST", "/v1/leads", body, ctype=None),
        Req("POST", "/v1/leads", body, ctype="text/plain"),
        Req("POST", "/v1/leads/batch", b"\n".join([_bad_key_line(1), body, _bad_key_line(2)]),
            ctype=NDJSON),
        Req("POST", "/v1/accounts/c1/credits", body, headers=(("Idempotency-Key", "deep"),)),
        Req("POST", "/v1/leads/000000000000000000000000/returns", body),
        Req("POST", "/v1/accounts/c1/funds", body, headers=(("Idempotency-Key", "deep"),)),
        Req("POST", "/v1/accounts/c1/payment-methods", body),
        Req("PUT", "/v1/accounts/c1/auto-recharge", body),
        Req("POST", "/v1/usage", body),
        Req("POST", "/v1/usage/batch", body),
        Req("POST", "/v1/usage", body, ctype=None),
    ]


# --- (b) numbers with at least one digit of another script ---------------------------------

_other_digit = st.characters(categories=["Nd"], exclude_characters="0123456789")
_piece = st.one_of(_other_digit, st.sampled_from("0123456789"), st.sampled_from("+-."))
digit_strings = st.builds(lambda a, d, b: "".join(a) + d + "".join(b),
                          st.lists(_piece, max_size=6), _other_digit, st.lists(_piece, max_size=6))


def numeric_requests(text: str) -> list[Req]:
    """``text`` in every numeric field of every endpoint (one field at a time)."""
    q = quote(text, safe="")
    usage = {"account": "c1", "meter": "sms", "quantity": text, "event_id": "u1"}
    reqs = [
        Req("POST", "/v1/accounts/c1/credits", _json({"amount": text}),
            headers=(("Idempotency-Key", "num"),)),
        Req("POST", "/v1/accounts/c1/funds", _json({"amount": text, "idempotency_key": "num"})),
        *(Req("PUT", "/v1/accounts/c1/auto-recharge", _json({name: text}))
          for name in ("threshold", "amount", "max_amount_per_day")),
        Req("POST", "/v1/usage", _json(usage)),
        Req("POST", "/v1/usage/batch", _json({"items": [usage]})),
        *(Req("GET", f"/v1/accounts/c1/ledger?{name}={q}", None)
          for name in ("limit", "before")),
        *(Req("GET", f"/v1/accounts/c1/transactions?{name}={q}", None)
          for name in ("limit", "from", "to", "cursor")),
        Req("POST", f"/v1/leads/{q}/returns", _json({"buyer": "b1", "reason": "wrong_number"})),
    ]
    for field in ("bill", "zip", "phone", "dob", "lp_campaign_id", "lp_supplier_id"):
        lead = {**LEAD, field: text}
        reqs += [
            Req("POST", "/v1/leads", _json(lead)),
            Req("POST", "/v1/leads", "&".join(f"{k}={quote(v, safe='')}"
                                               for k, v in lead.items()).encode(),
                ctype="application/x-www-form-urlencoded"),
            Req("POST", "/v1/leads/batch", b"\n".join([_bad_key_line(1), _json(lead)]),
                ctype=NDJSON),
        ]
    return reqs


# --- (c) header sizes and counts, around and far past the limits ------------------------------
# (max_header_bytes 32 KiB and max_headers 100 by default: engine.api.server)

_header_text = st.text(alphabet=string.ascii_letters + string.digits + "-_.;=", max_size=40)
header_sets = st.one_of(
    st.builds(lambda n, v: tuple((f"X-H{i}", v) for i in range(n)),
              st.one_of(st.integers(1, 3_000), st.integers(90, 110)), _header_text),
    st.builds(lambda size, c: (("X-Big", c * size),),
              st.one_of(st.integers(1, 300_000), st.integers(32_000, 33_500)),
              st.sampled_from("a9-;")),
)


def header_requests(headers: tuple[tuple[str, str], ...]) -> list[Req]:
    """``headers`` on requests refused for another reason when the headers pass: the answer
    is a 4xx (431 past the limits) and nothing moves either way."""
    bad_lead = _json({**LEAD, "lp_key": "wrong"})
    return [
        Req("POST", "/v1/leads", bad_lead, headers=headers),
        Req("POST", "/v1/leads/batch", bad_lead, ctype=NDJSON, headers=headers),
        Req("GET", "/v1/accounts/c1/ledger?limit=0", None, headers=headers),
        Req("POST", "/v1/accounts/c1/credits", _json({"amount": "-1.00"}),
            headers=(*headers, ("Idempotency-Key", "hdr"))),
    ]


def header_status(headers: tuple[tuple[str, str], ...]) -> int | None:
    """431 where these headers alone pass a limit; not 431 where, with the client's own few
    headers (Host, User-Agent, ...: under 8 and 600 bytes), they stay within both."""
    size = sum(len(n) + len(v) + 4 for n, v in headers)
    if len(headers) > 100 or size > 32 * 1024:
        return 431
    if len(headers) + 8 <= 100 and size + 600 <= 32 * 1024:
        return 0  # anything but 431
    return None


HOSTILE = [
    Hostile("deep_json", deep_bodies, body_requests),
    Hostile("unicode_digits", digit_strings, numeric_requests),
    Hostile("header_sizes", header_sets, header_requests, header_status),
]


# --- the test --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def engine(redis_server: Any) -> AsyncIterator[Engine]:
    """One engine for every example: t1 with a metered service and a campaign with number,
    zip, phone and dob fields."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()  # our own test server
    await client.aclose()
    async with running(make_config(CAMPAIGN, buyer("b1"), base=METERED),
                       redis_server.url) as eng:
        yield eng


async def _state(eng: Engine) -> dict[bytes, bytes | None]:
    """Every key of the database and its DUMP: equal snapshots, nothing written."""
    found = [k async for k in eng.redis.scan_iter(count=1_000)]
    async with eng.redis.pipeline(transaction=False) as pipe:
        for k in found:
            pipe.dump(k)
        dumps = await pipe.execute()
    return dict(zip(found, dumps, strict=True))


async def _send(eng: Engine, req: Req) -> tuple[int, bytes, str]:
    headers = {"Authorization": "Bearer tok-t1", **dict(req.headers)}
    if req.ctype is not None:
        headers["Content-Type"] = req.ctype
    async with eng.http.request(req.method, eng.url + req.path, data=req.body, headers=headers,
                                skip_auto_headers=["Content-Type"] if req.ctype is None else ()
                                ) as r:
        return r.status, await r.read(), r.headers.get("Content-Type", "")


def _refused(status: int, body: bytes, ctype: str) -> bool:
    """A 4xx, or a batch whose every line is an ERROR a client earned (codes below 1040:
    malformed, credentials, fields, sizes; 1040 and up are the server's)."""
    if "ndjson" in ctype and status == 200:
        lines = [msgspec.json.decode(x) for x in body.splitlines() if x]
        return bool(lines) and all(x["status"] == "ERROR" and x["code"] < 1040 for x in lines)
    return 400 <= status < 500


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
@seed(SEED)
@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_hostile_input_is_refused_and_changes_nothing(
        engine: Engine, hostile: Hostile, data: st.DataObject) -> None:
    value = data.draw(hostile.values, label=hostile.name)
    expected = hostile.status(value)
    before = await _state(engine)
    for req in hostile.requests(value):
        status, body, ctype = await _send(engine, req)
        assert status < 500, (req.method, req.path, status, body[:300])
        if expected is not None:
            assert (status == expected) if expected else (status != 431), (req.path, status)
        assert _refused(status, body, ctype), (req.method, req.path, status, body[:300])
        assert await _state(engine) == before, (req.method, req.path, status, body[:300])
