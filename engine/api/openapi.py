"""The OpenAPI 3.1 document of the HTTP API, built once from the route table.

Every operation comes from :data:`engine.api.endpoints.ENDPOINTS`, every schema from the
request and response Structs through ``msgspec.json.schema_components``, so the document
describes what the handlers encode and decode. Served at ``GET /openapi.json``
(engine.api.docs, with the API page).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from engine.api.endpoints import ENDPOINTS, JSON, Endpoint, Reply, err
from engine.api.schemas import Error
from engine.ingest.codes import LeadResponse

VERSION = "0.1.0"  # the API's version, as pyproject.toml's
REF = "#/components/schemas/{name}"
SECURITY_SCHEME = "tenantToken"
BUYER_SCHEME = "buyerKey"
_STATUS_TEXT = {200: "OK", 201: "Created"}

DESCRIPTION = """\
Lead ingest (`POST /v1/leads`, `POST /v1/leads/batch`) authenticates the seller with
`lp_supplier_id` and `lp_key` in the body and answers a `LeadResponse`. The tenant API
(accounts, buyers, returns, billing, usage, portal users and keys) takes the tenant's
bearer token and answers errors as `{"error": {"code", "message"}}`; a refused request
changes nothing. The operations that also list `buyerKey` take a buyer API key
(`Bearer lfk_...`) too, and answer it for the client accounts mapped to its user only (404
for any other); the others answer a buyer key 403 `forbidden_for_buyer_key`. Money is a
decimal string of ASCII digits (`"25.00"`). Codes and rules: the README's "HTTP API",
docs/billing.md and docs/portal.md.
"""

# the answers of the router and the server to any endpoint, besides its own
_TOO_LARGE = {"api": err("a body over its limit (64 KiB)", "too_large"),
              "lead": err("a body over `max_body_bytes` (64 KiB), or a batch over 8 MiB "
                          "or 10,000 lines", 1030)}
_UNAVAILABLE = err("Redis unreachable: nothing moved; retry", "unavailable")
_UNAUTHORIZED = err("no bearer token, or not a tenant's", "unauthorized")
_UNAUTHORIZED_BUYER = err("no bearer token, not a tenant's, or a buyer key that is unknown, "
                          "revoked, or of a disabled or deleted user", "unauthorized")
_FORBIDDEN = err("a buyer API key: this operation is the tenant's only",
                 "forbidden_for_buyer_key")


def _structs(endpoints: Iterable[Endpoint]) -> list[type]:
    """Every Struct the endpoints read or answer, each once, in a stable order."""
    seen: dict[type, None] = {Error: None, LeadResponse: None}
    for e in endpoints:
        if e.body is not None:
            seen[e.body] = None
        for reply in e.replies.values():
            if reply.body is not None:
                seen[reply.body] = None
    return list(seen)


def _replies(e: Endpoint) -> dict[int, Reply]:
    """The endpoint's own replies, with what the router, the server and the token check
    answer to any request; error codes of a status both give are merged."""
    common: dict[int, Reply] = {413: _TOO_LARGE[e.shape]}
    if e.shape == "api" or e.key != ("POST", "/v1/leads"):
        common[503] = _UNAVAILABLE
    if e.tenant:
        common[401] = _UNAUTHORIZED_BUYER if e.buyer else _UNAUTHORIZED
        if e.buyer is None:
            common[403] = _FORBIDDEN
    out = dict(e.replies)
    for status, reply in common.items():
        own = out.get(status)
        if own is None:
            out[status] = reply
        elif own.body is None and own.codes:
            codes = tuple(dict.fromkeys((*own.codes, *reply.codes)))
            out[status] = dataclasses.replace(own, codes=codes)
    return dict(sorted(out.items()))


def _code_enum(shape: str, codes: tuple[str | int, ...], base: Mapping[str, Any],
               error: bool) -> dict[str, Any]:
    """``base`` (a $ref) narrowed to these codes (and, for a lead error, status ERROR)."""
    if shape == "api":
        narrow: dict[str, Any] = {"properties": {"error": {
            "properties": {"code": {"enum": list(codes)}}}}}
    else:
        props: dict[str, Any] = {"code": {"enum": list(codes)}}
        if error:
            props["status"] = {"const": "ERROR"}
        narrow = {"properties": props}
    return {"allOf": [dict(base), narrow]}


class _Builder:
    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints
        types = _structs(endpoints)
        refs, self.components = msgspec.json.schema_components(types, ref_template=REF)
        self.ref: dict[type, dict[str, Any]] = dict(zip(types, refs, strict=True))

    def response(self, e: Endpoint, status: int, reply: Reply) -> dict[str, Any]:
        error = reply.body is None
        body = reply.body or (Error if e.shape == "api" else LeadResponse)
        schema: Mapping[str, Any] = self.ref[body]
        if reply.codes:
            schema = _code_enum(e.shape, reply.codes, schema, error)
        description = reply.description
        if reply.codes and error:
            description += " (" + ", ".join(f"`{c}`" for c in reply.codes) + ")"
        content: dict[str, Any] = {}
        for media in reply.media:
            if media == JSON and (reply.body is not None or error):
                content[media] = {"schema": schema}
            else:
                content[media] = {"schema": dict(reply.schema or {"type": "string"})}
        out: dict[str, Any] = {"description": description, "content": content}
        if reply.headers:
            out["headers"] = {k: dict(v) for k, v in reply.headers.items()}
        links = e.links.get(status)
        if links:
            out["links"] = {name: self.link(link) for name, link in links.items()}
        return out

    @staticmethod
    def link(link: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"operationId": link.operation_id}
        if link.parameters:
            out["parameters"] = dict(link.parameters)
        if link.request_body is not None:
            out["requestBody"] = link.request_body
        return out

    def operation(self, e: Endpoint) -> dict[str, Any]:
        op: dict[str, Any] = {"operationId": e.operation_id, "summary": e.summary,
                              "tags": [e.tag]}
        if e.description:
            op["description"] = e.description
        if e.params:
            op["parameters"] = [self.parameter(p) for p in e.params]
        if e.body is not None or e.body_schema is not None:
            schema = self.ref[e.body] if e.body is not None else dict(e.body_schema or {})
            op["requestBody"] = {"required": e.body_required,
                                 "content": {m: {"schema": schema} for m in e.body_media}}
        op["responses"] = {str(status): self.response(e, status, reply)
                           for status, reply in _replies(e).items()}
        op["security"] = ([{SECURITY_SCHEME: []}, {BUYER_SCHEME: []}] if e.buyer
                          else [{SECURITY_SCHEME: []}] if e.tenant else [])
        return op

    @staticmethod
    def parameter(p: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"name": p.name, "in": p.where,
                               "required": p.required or p.where == "path",
                               "schema": dict(p.schema)}
        if p.description:
            out["description"] = p.description
        return out

    def document(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for e in self.endpoints:
            paths.setdefault(e.path, {})[e.method.lower()] = self.operation(e)
        return {
            "openapi": "3.1.0",
            "info": {"title": "leadflow", "version": VERSION, "description": DESCRIPTION,
                     "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
            "paths": paths,
            "components": {
                "schemas": self.components,
                "securitySchemes": {
                    SECURITY_SCHEME: {
                        "type": "http", "scheme": "bearer",
                        "description": "the tenant's `api_token` (a token selects its tenant)"},
                    BUYER_SCHEME: {
                        "type": "http", "scheme": "bearer",
                        "description": (
                            "a buyer API key, `lfk_<id>_<secret>` (made by the tenant for a "
                            "portal user: `POST /v1/portal/users/{id}/keys`): the user's "
                            "mapped client accounts only (docs/portal.md)")},
                },
            },
        }


def document(endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``endpoints`` (every endpoint by default)."""
    return _Builder(endpoints).document()


def document_json(endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> bytes:
    return msgspec.json.encode(document(endpoints))
