"""The OpenAPI document (GET /openapi.json), the API page (GET /docs) and the route table
they share with the router."""

from __future__ import annotations

import json

import msgspec
import pytest
from openapi_spec_validator import validate

from engine.api import endpoints, openapi
from engine.api.toolkit import Router
from tests.helpers.harness import buyer, campaign, make_config, running

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@pytest.fixture
def cfg():
    return make_config(campaign(), buyer("b1", price="10.00"))


def _operations(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item
            if m in METHODS}


def test_the_document_is_valid_openapi_3_1():
    doc = openapi.document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # openapi-spec-validator: the 3.1 schema, every $ref resolves
    # JSON all the way (as served), and every operation id unique
    json.loads(openapi.document_json())
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_every_schema_comes_from_a_struct_and_errors_name_their_codes():
    doc = openapi.document()
    schemas = doc["components"]["schemas"]
    for name in ("Error", "LeadResponse", "AccountView", "CreditBody", "FundBody", "Usage",
                 "Overview", "TransactionPage", "FieldError"):
        assert name in schemas, name
    credit = doc["paths"]["/v1/accounts/{id}/credits"]["post"]
    assert credit["security"] == [{"tenantToken": []}]
    assert credit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreditBody"}
    bad = credit["responses"]["400"]["content"]["application/json"]["schema"]["allOf"]
    assert bad[0] == {"$ref": "#/components/schemas/Error"}
    assert "missing_idempotency_key" in bad[1]["properties"]["error"]["properties"]["code"]["enum"]
    # every tenant endpoint answers 401, every endpoint 413 and 503 in its own shape
    for path, item in doc["paths"].items():
        for op in item.values():
            assert {"413", "503"} <= set(op["responses"]), (path, op["operationId"])
            if op["security"]:
                assert "401" in op["responses"], path
    lead = doc["paths"]["/v1/leads"]["post"]
    assert lead["security"] == []
    assert set(lead["requestBody"]["content"]) == {"application/json",
                                                   "application/x-www-form-urlencoded"}
    unavailable = lead["responses"]["503"]["content"]["application/json"]["schema"]["allOf"]
    assert unavailable[1]["properties"]["code"] == {"enum": [1040]}
    assert doc["components"]["securitySchemes"]["tenantToken"]["scheme"] == "bearer"


def test_the_router_refuses_a_route_the_table_does_not_declare():
    router = Router(declared=endpoints.BY_KEY)

    async def handler(req):
        raise AssertionError

    router.add("GET", "/healthz", handler)
    with pytest.raises(LookupError):
        router.add("GET", "/v1/undeclared", handler)


async def test_every_route_served_is_in_the_document_and_back(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        served = set(eng.app.router.routes())
        async with eng.http.get(eng.url + "/openapi.json") as r:
            assert r.status == 200 and r.content_type == "application/json"
            doc = await r.json()
    assert served == _operations(doc) == set(endpoints.BY_KEY)
    assert doc == msgspec.json.decode(openapi.document_json())


async def test_the_api_page_and_its_files_come_from_the_engine(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        async with eng.http.get(eng.url + "/docs") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
        assert "<script>" not in page and "http" not in page.replace("http-equiv", "")
        scripts = ["/docs/static/swagger-ui-bundle.js", "/docs/static/leadflow-docs.js"]
        for src in [*scripts, "/docs/static/swagger-ui.css"]:
            assert src in page
            async with eng.http.get(eng.url + src) as r:
                assert r.status == 200, src
                body = await r.read()
                assert len(body) > 100
        async with eng.http.get(eng.url + "/docs/static/leadflow-docs.js") as r:
            assert 'url: "/openapi.json"' in await r.text()
            assert r.content_type == "text/javascript"
        # only the page's own files: nothing else of the file system
        for name in ("..%2F..%2Fpyproject.toml", "index.html", "swagger-ui.js"):
            async with eng.http.get(eng.url + "/docs/static/" + name) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "not_found"


async def test_a_405_names_the_methods_of_the_path(redis, redis_server, cfg):
    """RFC 9110: a 405 carries Allow. It had none."""
    async with running(cfg, redis_server.url) as eng:
        async with eng.http.get(eng.url + "/v1/leads") as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
        async with eng.http.request("PATCH", eng.url + "/v1/accounts/c1/payment-methods/pm_1") as r:
            assert r.status == 405 and r.headers["Allow"] == "DELETE"
        async with eng.http.request("OPTIONS", eng.url + "/v1/accounts/c1/payment-methods") as r:
            assert r.status == 405 and r.headers["Allow"] == "GET, POST"


async def test_a_path_parameter_may_hold_an_encoded_slash(redis, redis_server, cfg):
    """An id with a "/" (sent as %2F) is one parameter: it was split into two path
    segments and reached another route or none (404 not_found, 405)."""
    async with running(cfg, redis_server.url) as eng:
        status, body = await eng.api("GET", "/v1/accounts/c1%2Fcredits")
        assert status == 404 and body["error"]["code"] == "unknown_account", body
        status, body = await eng.api("POST", "/v1/buyers/x%2Fy/pause")
        assert status == 404 and body["error"]["code"] == "unknown_buyer", body
        status, body = await eng.api("GET", "/v1/accounts/c%31")  # %31 is "1"
        assert status == 200 and body["id"] == "c1"


def test_the_notification_endpoints_are_documented_with_their_codes():
    from engine.api.schemas import NOTIFY_CATEGORIES
    from engine.notify import prefs, templates

    assert list(NOTIFY_CATEGORIES) == list(prefs.CATEGORIES)
    doc = openapi.document()
    put = doc["paths"]["/v1/notify/templates/{kind}"]["put"]
    assert put["security"] == [{"tenantToken": []}]
    assert put["parameters"][0]["schema"]["enum"] == list(templates.KINDS)

    def codes(op: dict, status: str) -> list:
        schema = op["responses"][status]["content"]["application/json"]["schema"]["allOf"]
        return schema[1]["properties"]["error"]["properties"]["code"]["enum"]

    assert "template_invalid" in codes(put, "400") and codes(put, "404") == ["unknown_kind"]
    assert codes(put, "413") == ["too_large"] and "512 KiB" in put["responses"]["413"][
        "description"]
    test = doc["paths"]["/v1/notify/templates/{kind}/test"]["post"]
    assert set(codes(test, "409")) == {"no_transport", "no_operator_address",
                                       "template_invalid"}
    assert codes(test, "502") == ["send_failed"]
    prefs_put = doc["paths"]["/v1/notify/preferences"]["put"]
    assert {"unknown_category", "invalid_address"} <= set(codes(prefs_put, "400"))
    for method in ("get", "post"):
        op = doc["paths"]["/v1/notify/unsubscribe"][method]
        assert op["security"] == [] and codes(op, "400") == ["invalid_token"]
        assert "text/html" in op["responses"]["200"]["content"]
