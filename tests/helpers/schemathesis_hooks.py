"""Schemathesis hooks for the run against a live engine (tests/integration/test_schemathesis.py).

Loaded by the schemathesis CLI (``SCHEMATHESIS_HOOKS=<this file>``), not by pytest. The
document describes ids as any text, so most generated ids name nothing (404): these hooks
let a share of the *positive* cases (schema-valid data) use what the engine under test
really has, read from the JSON file named by ``LEADFLOW_SCHEMATHESIS_DATA`` (the tenant's
accounts, buyers and meters, valid leads of its campaigns with their keys, payment methods
made at localstripe), so the run reaches the handlers' logic past the lookup: credits,
usage debits, sales and returns, card attach, funding and refunds. The choice is one more
Hypothesis draw, so the run stays reproducible from its seed. Negative cases are never
touched: they must stay invalid.

It also teaches schemathesis to send an NDJSON body (``POST /v1/leads/batch``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

_PATH = os.environ.get("LEADFLOW_SCHEMATHESIS_DATA")
DATA: dict[str, Any] = json.loads(open(_PATH).read()) if _PATH else {}  # noqa: SIM115


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    """A string as it is; anything else as one JSON line per item (or one line)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def _form(lead: dict[str, Any]) -> dict[str, str]:
    """A lead as form fields: text values (JSON booleans as true/false)."""
    return {k: ("true" if v is True else "false" if v is False else str(v))
            for k, v in lead.items()}


def _maybe(values: list[Any]) -> st.SearchStrategy[Any]:
    """None (keep what schemathesis generated) a quarter of the time, else one of these."""
    if not values:
        return st.none()
    return st.one_of(st.none(), st.sampled_from(values), st.sampled_from(values),
                     st.sampled_from(values))


def _set_id(case: Any, value: Any) -> Any:
    if value is not None:
        case.path_parameters = {**(case.path_parameters or {}), "id": value}
    return case


def _set_body(case: Any, patch: dict[str, Any] | None) -> Any:
    if patch is not None and isinstance(case.body, dict):
        case.body = {**case.body, **patch}
    return case


def _lead_body(case: Any, lead: dict[str, Any] | None) -> Any:
    if lead is not None:
        form = case.media_type == "application/x-www-form-urlencoded"
        case.body = _form(lead) if form else dict(lead)
    return case


def _batch_body(case: Any, leads: list[dict[str, Any]] | None) -> Any:
    if leads:
        case.body = "".join(json.dumps(lead) + "\n" for lead in leads)
    return case


def _usage_patch(accounts: list[str], meters: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.fixed_dictionaries({
        "account": st.sampled_from(accounts), "meter": st.sampled_from(meters)}))


@schemathesis.hook
def filter_case(ctx: Any, case: Any) -> bool:
    """Drop the "negative" bodies of ``POST /v1/leads/batch``: its body is NDJSON text,
    where every byte string is a batch (each line gets its own verdict, a line that is not
    a lead an ERROR line, in a 200), so a body that breaks the document's ``string`` (an
    object, a number) does not exist on the wire: the serializer would send it as lines."""
    meta = case.meta
    return not (case.operation.path == "/v1/leads/batch" and meta is not None
                and meta.generation.mode.is_negative and not isinstance(case.body, str))


@schemathesis.hook
def flatmap_case(ctx: Any, case: Any) -> st.SearchStrategy[Any]:
    meta = case.meta
    if not DATA or meta is None or not meta.generation.mode.is_positive:
        return st.just(case)
    path, method = case.operation.path, case.method.upper()
    accounts, buyers = DATA["accounts"], DATA["buyers"]
    leads, meters = DATA["leads"], DATA["meters"]
    if path.startswith("/v1/accounts/{id}"):
        strategy = _maybe(accounts).map(lambda v: _set_id(case, v))
        if path.endswith("/payment-methods") and method == "POST":
            pms = DATA["payment_methods"]
            strategy = strategy.flatmap(lambda c: _maybe(pms).map(
                lambda pm: _set_body(c, None if pm is None else {"payment_method": pm})))
        elif path.endswith("/funds"):
            strategy = strategy.flatmap(lambda c: _maybe(["100.00", "250.00"]).map(
                lambda a: _set_body(c, None if a is None else {"amount": a})))
        return strategy
    if path.startswith("/v1/buyers/{id}"):
        return _maybe(buyers).map(lambda v: _set_id(case, v))
    if path == "/v1/leads/{id}/returns":
        return st.one_of(st.none(), st.fixed_dictionaries({
            "buyer": st.sampled_from(buyers), "reason": st.sampled_from(DATA["reasons"])}),
        ).map(lambda patch: _set_body(case, patch))
    if path in ("/v1/portal/users", "/v1/portal/users/{id}") and method in ("POST", "PATCH"):
        clients = DATA.get("clients", [])  # the tenant's client accounts: a mapping it may make
        return st.one_of(st.none(), st.lists(st.sampled_from(clients), max_size=3)).map(
            lambda accounts: _set_body(case, None if accounts is None else {"accounts": accounts}))
    if path == "/v1/usage":
        return _usage_patch(accounts, meters).map(lambda patch: _set_body(case, patch))
    if path == "/v1/usage/batch" and isinstance(case.body, dict) and case.body.get("items"):
        def items(patches: list[Any]) -> Any:
            case.body = {**case.body, "items": [
                {**item, **p} if p and isinstance(item, dict) else item
                for item, p in zip(case.body["items"], patches, strict=False)]}
            return case

        n = len(case.body["items"])
        return st.lists(_usage_patch(accounts, meters), min_size=n, max_size=n).map(items)
    if path == "/v1/leads":
        return _maybe(leads).map(lambda lead: _lead_body(case, lead))
    if path == "/v1/leads/batch":
        return st.one_of(st.none(), st.lists(st.sampled_from(leads), min_size=1,
                                             max_size=5)).map(lambda b: _batch_body(case, b))
    return st.just(case)
