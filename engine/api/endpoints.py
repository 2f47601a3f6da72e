"""Every HTTP endpoint, declared once: method, path, what it reads and what it answers.

The router registers only what is declared here (engine.api.toolkit.Router refuses any other
route, and the service checks at start that every declared route is mounted), and
engine.api.openapi builds the OpenAPI document from the same declarations, so the two cannot
drift. This module names request/response Structs and status codes; it imports no
handler, store or service.

Error codes per status are the ones the handlers answer (README "HTTP API",
docs/billing.md "Error codes"); the document lists them as an ``enum`` of ``error.code``
(``code`` of a LeadResponse for the ingest endpoints), so a response with an undocumented
code does not match the document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from billing.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    AlertBody,
    AlertSettings,
    AttachBody,
    AutoRechargeSettings,
    BalanceRefund,
    BatchBody,
    FundBody,
    FundResult,
    Method,
    MethodList,
    Overview,
    TransactionPage,
    Usage,
    UsageBatchResult,
    UsageResult,
)
from engine.api.schemas import (
    AcceptInviteBody,
    AccountView,
    ApiKeyView,
    BuyerState,
    CreatedKey,
    CreatedUser,
    CreateKeyBody,
    CreateUserBody,
    CreditBody,
    CreditResult,
    DeletedUser,
    Health,
    Invitation,
    KeyList,
    LeadPost,
    LedgerPage,
    PingBody,
    PortalUser,
    PostBody,
    Preferences,
    PreferencesBody,
    PreviewBody,
    Readiness,
    RenderedMessage,
    ReturnBody,
    ReturnResult,
    SampleSent,
    TemplateBody,
    TemplateList,
    TemplateView,
    UpdateUserBody,
    UserList,
)
from engine.core.config import AutoRecharge
from engine.ingest.codes import LeadResponse
from engine.ingest.pingpost import PingResponse
from engine.notify.prefs import MAX_TOKEN, UNSUBSCRIBE_PATH
from engine.notify.templates import KINDS

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
NDJSON = "application/x-ndjson"
Shape = Literal["api", "lead"]  # the error shape: {"error": {...}}, or a LeadResponse
# What a buyer API key may reach of a tenant endpoint (docs/portal.md "Access"): the client
# account of the path's {id}, the buyer of the path's {id} (its client account), or a sale
# named in the body (the handler checks the buyer's client account); None: the tenant only
# (a buyer key gets 403 forbidden_for_buyer_key)
BuyerScope = Literal["account", "buyer", "sale"]


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter, with its JSON Schema."""

    name: str
    where: Literal["path", "query", "header"]
    schema: Mapping[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Reply:
    """One response status: its body (a Struct, encoded as JSON; or a raw JSON Schema for
    other media types), and, for an error status, the codes it carries."""

    description: str
    body: type | None = None
    codes: tuple[str | int, ...] = ()
    media: tuple[str, ...] = (JSON,)
    schema: Mapping[str, Any] | None = None  # for a body that is not a Struct
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: the operation a response leads to, and where its parameters (and
    body) come from (runtime expressions: ``$request.path.id``, ``$response.body#/x``)."""

    operation_id: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    request_body: Any = None


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    replies: Mapping[int, Reply]
    description: str = ""
    body: type | None = None  # the request body's Struct
    body_media: tuple[str, ...] = (JSON,)
    body_schema: Mapping[str, Any] | None = None  # a request body that is not a Struct
    body_required: bool = True
    params: tuple[Param, ...] = ()
    tenant: bool = False  # behind the tenant's bearer token (401 unauthorized without)
    buyer: BuyerScope | None = None  # also a buyer API key's, for its mapped accounts only
    shape: Shape = "api"
    links: Mapping[int, Mapping[str, Link]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.path


# ---- parameters ----------------------------------------------------------------------------

_ID = {"type": "string", "minLength": 1}
ACCOUNT_ID = Param("id", "path", {**_ID, "examples": ["wallet"]},
                   "a client account id of the tenant, or `wallet` (its platform wallet)",
                   required=True)
BUYER_ID = Param("id", "path", _ID, "a buyer id of the tenant", required=True)
LEAD_ID = Param("id", "path", _ID, "the lead id of a sale (`lead_id` of its decision)",
                required=True)
PM_ID = Param("pm", "path", {**_ID, "examples": ["pm_card_visa"]},
              "a payment method on the account", required=True)
IDEMPOTENCY_LEAD = Param(
    "Idempotency-Key", "header", {"type": "string"},
    "the same key returns the first result (24 h) and charges nothing again")
_LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
# an empty filter is no filter: /transactions reads "from=" as no "from"
_TX_CURSOR = {"type": "string", "pattern": r"^([0-9]{1,19}(-[0-9]{1,19})?)?$"}

# ---- replies -------------------------------------------------------------------------------


def ok(body: type, description: str = "OK") -> Reply:
    return Reply(description, body)


def err(description: str, *codes: str | int) -> Reply:
    return Reply(description, None, codes)


NOT_JSON = ("invalid_body", "unsupported_media_type")
# what any call that reaches Stripe may answer besides its own refusals
CARD_402 = ("card_declined", "authentication_required", "payment_failed")
STRIPE_404 = ("unknown_payment_method",)
STRIPE_502 = err("Stripe refused the request", "payment_error")
STRIPE_503 = err("Stripe unreachable, or not configured by the operator (no key); retry "
                 "later (nothing moved twice: requests are idempotent)",
                 "payment_unavailable", "stripe_not_configured")
NO_ACCOUNT = err("no such account of this tenant", "unknown_account")

_DECISION = (
    "A decision (every decision is HTTP 200): `ACCEPTED` 0 (1: a sync waterfall cut off by "
    "a crash), `DUPLICATED` 100/101, `REJECTED` 200-205 (README \"Response codes\")")
LEAD_REPLIES: Mapping[int, Reply] = {
    200: Reply(_DECISION, LeadResponse, (0, 1, 100, 101, 200, 201, 202, 203, 204, 205)),
    400: err("malformed body (1000), missing or mistyped credentials (1001), more than 200 "
             "fields (1003)", 1000, 1001, 1003),
    401: err("unknown supplier or wrong lp_key", 1011),
    403: err("the supplier may not post to this campaign", 1012),
    404: err("unknown campaign", 1010),
    415: err("a content type other than JSON or form", 1031),
    422: err("field validation failed: `errors` lists every bad field", 1020),
    500: err("decide.lua failed on this lead: every write taken back, nothing charged; "
             "a retry is decided afresh", 1050),
    503: err("Redis unreachable: nothing was charged; retry (replays are idempotent)", 1040),
}

PING_REPLIES: Mapping[int, Reply] = {
    200: Reply("ACCEPTED with the bids offered (held until expires_at), or REJECTED: no "
               "bid (206), the tenant wallet at its floor (203)", PingResponse, (0, 203, 206)),
    400: err("malformed body (1000), missing credentials (1001), more than 200 fields "
             "(1003), a campaign without ping-post (1060)", 1000, 1001, 1003, 1060),
    401: err("unknown supplier or wrong lp_key", 1011),
    403: err("the supplier may not post to this campaign", 1012),
    404: err("unknown campaign", 1010),
    415: err("a content type other than JSON or form", 1031),
    422: err("ping field validation failed: `errors` lists every bad field", 1020),
    503: err("Redis unreachable: nothing was held or charged; retry", 1040),
}
POST_REPLIES: Mapping[int, Reply] = {
    200: Reply(_DECISION, LeadResponse, (0, 1, 100, 101, 200, 201, 202, 203, 204, 205)),
    400: err("malformed body (1000), missing credentials (1001), more than 200 fields "
             "(1003), a campaign without ping-post (1060)", 1000, 1001, 1003, 1060),
    401: err("unknown supplier or wrong lp_key", 1011),
    403: err("the supplier may not post to this campaign (1012), or the ping was made by "
             "another supplier (1065)", 1012, 1065),
    404: err("unknown campaign (1010) or unknown ping of this tenant and campaign (1061)",
             1010, 1061),
    409: err("the ping was already posted (another post; a replay returns its result)",
             1062),
    410: err("the ping expired, or its holds were released", 1064),
    415: err("a content type other than JSON or form", 1031),
    422: err("field validation failed (1020), the post changes a ping field (1063), a "
             "bid_id not offered by the ping (1066)", 1020, 1063, 1066),
    500: err("decide.lua failed on this post: every write taken back, nothing charged, "
             "the holds kept; a retry is decided afresh", 1050),
    503: err("Redis unreachable: nothing was charged; retry (replays are idempotent)", 1040),
}

_TEXT = {"type": "string"}

# ---- the table -----------------------------------------------------------------------------

ACCOUNT = "/v1/accounts/{id}"
PM = ACCOUNT + "/payment-methods/{pm}"
_CARD_REPLIES: Mapping[int, Reply] = {
    200: ok(MethodList, "the account's cards, the primary first"),
    404: err("no such account, or no such card on it", "unknown_account",
             "unknown_payment_method"),
}
_ACCOUNT_LINKS = {
    "account": Link("getAccount", {"id": "$request.path.id"}),
    "ledger": Link("getLedger", {"id": "$request.path.id"}),
    "overview": Link("getOverview", {"id": "$request.path.id"}),
}


def _card(action: str, summary: str, method: str = "POST", **extra: Reply) -> Endpoint:
    replies = dict(_CARD_REPLIES)
    replies.update({int(k.removeprefix("s")): v for k, v in extra.items()})
    path = PM if action == "detach" else f"{PM}/{action}"
    return Endpoint(method, path, f"{action}PaymentMethod", summary, "billing", replies,
                    params=(ACCOUNT_ID, PM_ID), tenant=True, buyer="account")


USERS = "/v1/portal/users"
USER = USERS + "/{id}"
USER_ID = Param("id", "path", {**_ID, "examples": ["usr_0123456789abcdef"]},
                "a portal user of the tenant", required=True)
KEY_ID = Param("key_id", "path", {**_ID, "examples": ["0123456789abcdef"]},
               "a buyer API key's id (`id` of the key, the hex after `lfk_`)", required=True)
NO_IDENTITY = err("the identity store (SQL) could not be opened: nothing changed",
                  "unavailable")
NO_USER = err("no such user of this tenant", "unknown_user")
_USER_LINKS = {
    "user": Link("getPortalUser", {"id": "$response.body#/user/id"}),
    "update": Link("updatePortalUser", {"id": "$response.body#/user/id"}),
    "delete": Link("deletePortalUser", {"id": "$response.body#/user/id"}),
    "invite": Link("invitePortalUser", {"id": "$response.body#/user/id"}),
    "createKey": Link("createApiKey", {"id": "$response.body#/user/id"}),
    "keys": Link("listApiKeys", {"id": "$response.body#/user/id"}),
}


# -- e-mail notifications (#19; docs/notifications.md) --------------------------------------

TEMPLATES = "/v1/notify/templates"
KIND = Param("kind", "path", {"type": "string", "enum": list(KINDS)},
             "a message kind", required=True)
UNKNOWN_KIND = err("no such message kind", "unknown_kind")
_TOO_LARGE_TEMPLATES = err("a body over 512 KiB (room for three templates of 64 KiB, "
                           "JSON-escaped)", "too_large")
_TEMPLATE_400 = ("template_invalid: a template does not render against the kind's sample data "
                 "(syntax error, unknown variable, not allowed by the sandbox, over 64 KiB, "
                 "too slow or too large to render); the message names the part and the reason")
_STORED_409 = err("the tenant's stored template no longer renders against the sample data "
                  "(PUT a new one, or DELETE it)", "template_invalid")
_PAGE = {"type": "string"}
_TOKEN = Param("t", "query", {"type": "string", "minLength": 1, "maxLength": MAX_TOKEN},
               "the token of the message's link", required=True)
_INVALID_TOKEN = err("a token that is missing, malformed or not signed by the engine: nothing "
                     "changed", "invalid_token")
NOTIFY_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", TEMPLATES, "listTemplates", "The message kinds, and which the tenant "
             "overrides", "notifications", {200: ok(TemplateList)}, tenant=True),
    Endpoint("GET", TEMPLATES + "/{kind}", "getTemplate",
             "A kind's templates in force, and its default", "notifications",
             {200: ok(TemplateView), 404: UNKNOWN_KIND}, params=(KIND,), tenant=True),
    Endpoint(
        "PUT", TEMPLATES + "/{kind}", "putTemplate", "Override a kind's templates",
        "notifications",
        {200: ok(TemplateView, "stored: the tenant's templates are in force"),
         400: err("refused, nothing stored: " + _TEMPLATE_400, *NOT_JSON, "template_invalid"),
         404: UNKNOWN_KIND, 413: _TOO_LARGE_TEMPLATES},
        description=(
            "Jinja2 templates with the kind's variables (`GET` lists them); amounts are "
            "integer micros shown with the `money` filter. Each is rendered against the "
            "kind's sample data in a sandboxed child process before it is stored; an "
            "optional kind's templates must render with and without `unsubscribe_url` "
            "(`{% if unsubscribe_url is defined %}`)."),
        body=TemplateBody, params=(KIND,), tenant=True,
        links={200: {"preview": Link("previewTemplate", {"kind": "$request.path.kind"})}},
    ),
    Endpoint("DELETE", TEMPLATES + "/{kind}", "deleteTemplate",
             "Back to the default templates (again: no change)", "notifications",
             {200: ok(TemplateView, "the default is in force"), 404: UNKNOWN_KIND},
             params=(KIND,), tenant=True),
    Endpoint(
        "POST", TEMPLATES + "/{kind}/preview", "previewTemplate",
        "Render templates with the kind's sample data", "notifications",
        {200: ok(RenderedMessage, "rendered; nothing sent, nothing stored"),
         400: err("refused: " + _TEMPLATE_400, *NOT_JSON, "template_invalid"),
         404: UNKNOWN_KIND, 409: _STORED_409, 413: _TOO_LARGE_TEMPLATES},
        description="No body: the templates in force. A body's parts replace theirs.",
        body=PreviewBody, body_required=False, params=(KIND,), tenant=True,
    ),
    Endpoint(
        "POST", TEMPLATES + "/{kind}/test", "testTemplate",
        "Send the kind, with its sample data, to the tenant's own addresses",
        "notifications",
        {200: ok(SampleSent, "sent to each of the tenant's `notify.operators`"),
         404: UNKNOWN_KIND,
         409: err("no mail transport (`[tenants.notify.smtp]`), no address of the tenant's "
                  "own (`notify.operators`), or its stored template no longer renders",
                  "no_transport", "no_operator_address", "template_invalid"),
         502: err("the tenant's mail server could not be reached or refused the message "
                  "(the message says to how many it was sent before)", "send_failed")},
        description=(
            "The templates in force, rendered with the sample data, sent at once through "
            "the tenant's transport; not deduplicated (each call sends again)."),
        params=(KIND,), tenant=True,
    ),
    Endpoint(
        "GET", "/v1/notify/preferences", "getPreferences",
        "Which categories an address receives", "notifications",
        {200: ok(Preferences),
         400: err("no `address`, or not an e-mail address", "invalid_address")},
        params=(Param("address", "query", {"type": "string", "format": "email",
                                           "minLength": 3, "maxLength": 254},
                      "an e-mail address (compared lower-cased)", required=True),),
        tenant=True,
    ),
    Endpoint(
        "PUT", "/v1/notify/preferences", "putPreferences",
        "Turn categories on or off for an address", "notifications",
        {200: ok(Preferences, "every category of the address, after the change"),
         400: err("refused, nothing changed", *NOT_JSON, "invalid_address",
                  "unknown_category")},
        body=PreferencesBody, tenant=True,
    ),
    Endpoint(
        "GET", UNSUBSCRIBE_PATH, "unsubscribePage",
        "The page of an e-mail's unsubscribe link (changes nothing)", "notifications",
        {200: Reply("a page with a button that POSTs the same link", media=("text/html",),
                    schema=_PAGE),
         400: _INVALID_TOKEN},
        description=("No bearer token: the link's. A GET never unsubscribes (mail scanners "
                     "and previews follow links)."),
        params=(_TOKEN,),
    ),
    Endpoint(
        "POST", UNSUBSCRIBE_PATH, "unsubscribe",
        "Unsubscribe: the page's button, or a mail client's one-click POST (RFC 8058)",
        "notifications",
        {200: Reply("unsubscribed (again: the same)", media=("text/html",), schema=_PAGE),
         400: _INVALID_TOKEN,
         413: err("a body over 4 KiB", "too_large")},
        description=("Turns the link's category off for its address. The token is the "
                     "query's `t` (a form's `t` without one); the body "
                     "(`List-Unsubscribe=One-Click`) is not needed."),
        body_schema={"type": "object", "properties": {
            "List-Unsubscribe": {"type": "string"}, "t": {"type": "string"}}},
        body_media=(FORM,), body_required=False, params=(
            Param("t", "query", {"type": "string", "maxLength": MAX_TOKEN},
                  "the token of the message's link (or the form's `t`)"),),
    ),
)

ENDPOINTS: tuple[Endpoint, ...] = (
    # -- lead ingest ---------------------------------------------------------------------
    Endpoint(
        "POST", "/v1/leads", "postLead", "Post one lead", "leads", LEAD_REPLIES,
        description=(
            "JSON or form, in the Lead Prosper direct-post shape, with the campaign's own "
            "fields. The same payload from the same supplier within 60 s, or the same "
            "`Idempotency-Key` (24 h), returns the first result and charges nothing again."),
        body=LeadPost, body_media=(JSON, FORM), params=(IDEMPOTENCY_LEAD,), shape="lead",
        links={200: {"returnLead": Link("returnLead", {"id": "$response.body#/lead_id"})}},
    ),
    Endpoint(
        "POST", "/v1/ping", "ping", "Ping: collect bids and hold the bidders' funds", "leads",
        PING_REPLIES,
        description=(
            "Ping-post (docs/pingpost.md). The campaign's ping fields only; eligible ping "
            "buyers bid in parallel within `ping_deadline_ms`; each bid is held on its "
            "buyer's account until the post or `expires_at`. The same `Idempotency-Key` "
            "returns the first answer and asks no buyer again."),
        body=PingBody, body_media=(JSON, FORM), params=(IDEMPOTENCY_LEAD,), shape="lead",
    ),
    Endpoint(
        "POST", "/v1/post", "post", "Post the full lead of a ping", "leads", POST_REPLIES,
        description=(
            "The full lead and `lp_ping_id` (shared auctions: `bid_ids`). Sold to the held "
            "bidder(s) at their bids; answered as a direct post. Idempotent as direct posts."),
        body=PostBody, body_media=(JSON, FORM), params=(IDEMPOTENCY_LEAD,), shape="lead",
    ),
    Endpoint(
        "POST", "/v1/leads/batch", "postLeadBatch", "Post leads as NDJSON", "leads",
        {200: Reply("one LeadResponse per non-blank line, in order (NDJSON; no line: an "
                    "empty body)", media=(NDJSON,), schema=_TEXT),
         415: err("a content type other than NDJSON, JSON, text, octet-stream or form",
                  1031)},
        description=(
            "One JSON lead (the shape of `POST /v1/leads`) per line, each decided on its "
            "own; a bad line is an ERROR line (1000, 1030), the others go on. At most "
            "10,000 lines and 8 MiB (else 413 / 1030, nothing decided). With an "
            "`Idempotency-Key`, each line is remembered by the key and its content."),
        body_schema=_TEXT, body_media=(NDJSON,), body_required=False,
        params=(IDEMPOTENCY_LEAD,), shape="lead",
    ),
    # -- health and metrics --------------------------------------------------------------
    Endpoint("GET", "/healthz", "healthz", "Alive", "health", {200: ok(Health)}),
    Endpoint("GET", "/readyz", "readyz", "Ready to serve", "health", {
        200: ok(Readiness, "ready"),
        503: Reply("not ready: Redis unreachable, scripts not loaded, draining, or an "
                   "in-process worker died", Readiness)}),
    Endpoint("GET", "/metrics", "metrics", "Prometheus metrics", "health", {
        200: Reply("the Prometheus text format (OpenMetrics when asked for in `Accept`)",
                   media=("text/plain", "application/openmetrics-text"), schema=_TEXT)}),
    # -- the document and its viewer -----------------------------------------------------
    Endpoint("GET", "/openapi.json", "openapi", "This OpenAPI document", "docs", {
        200: Reply("the OpenAPI 3.1 document", schema={"type": "object"})}),
    Endpoint("GET", "/docs", "docs", "The API page (Swagger UI)", "docs", {
        200: Reply("an HTML page", media=("text/html",), schema=_TEXT)}),
    Endpoint("GET", "/docs/static/{file}", "docsStatic", "The API page's static files",
             "docs", {
                 200: Reply("a file of Swagger UI (shipped with leadflow, no CDN)",
                            media=("text/javascript", "text/css", "image/png"),
                            schema=_TEXT),
                 404: err("no such file", "not_found")},
             params=(Param("file", "path", _ID, required=True),)),
    # -- accounts ------------------------------------------------------------------------
    Endpoint("GET", ACCOUNT, "getAccount", "An account's balance, floor and status",
             "accounts", {200: ok(AccountView), 404: NO_ACCOUNT},
             params=(ACCOUNT_ID,), tenant=True, buyer="account"),
    Endpoint(
        "GET", ACCOUNT + "/ledger", "getLedger", "An account's ledger, newest first",
        "accounts",
        {200: ok(LedgerPage),
         400: err("a `limit` that is not ASCII digits from 1 to 1000, or a `before` that is "
                  "not an entry id", "invalid_limit", "invalid_cursor"),
         404: NO_ACCOUNT},
        params=(ACCOUNT_ID,
                Param("limit", "query", _LIMIT, "entries per page"),
                Param("before", "query", {"type": "string", "pattern": r"^[0-9]+(-[0-9]+)?$"},
                      "the entries before this entry id (`next_before` of the previous "
                      "page); a bare `ms`: before that millisecond")),
        tenant=True, buyer="account",
        links={200: {"nextPage": Link("getLedger", {"id": "$request.path.id",
                                                    "before": "$response.body#/next_before"})}},
    ),
    Endpoint(
        "POST", ACCOUNT + "/credits", "creditAccount",
        "A manual credit: a payment received outside leadflow", "accounts",
        {201: ok(CreditResult, "credited"),
         200: ok(CreditResult, "a retry with the same Idempotency-Key: nothing credited "
                               "again (`replay`: true)"),
         400: err("refused, nothing moved", *NOT_JSON, "invalid_amount",
                  "missing_idempotency_key", "idempotency_conflict"),
         403: err("the platform wallet takes no manual credit from the tenant",
                  "wallet_not_creditable"),
         404: NO_ACCOUNT,
         409: err("the account is closed, or the balance would pass +-$1,000,000,000",
                  "account_closed", "balance_limit")},
        body=CreditBody,
        params=(ACCOUNT_ID, Param("Idempotency-Key", "header",
                                  {"type": "string", "minLength": 1, "maxLength": 255},
                                  "required: a retry never credits twice", required=True)),
        tenant=True, links={201: _ACCOUNT_LINKS},
    ),
    Endpoint("POST", "/v1/buyers/{id}/pause", "pauseBuyer", "Pause a buyer by hand", "buyers",
             {200: ok(BuyerState), 404: err("no such buyer of this tenant", "unknown_buyer")},
             params=(BUYER_ID,), tenant=True, buyer="buyer",
             links={200: {"resume": Link("resumeBuyer", {"id": "$request.path.id"})}}),
    Endpoint("POST", "/v1/buyers/{id}/resume", "resumeBuyer", "Resume a buyer paused by hand",
             "buyers",
             {200: ok(BuyerState), 404: err("no such buyer of this tenant", "unknown_buyer"),
              409: err("the config pauses this buyer (status = \"paused\")",
                       "paused_by_config")},
             params=(BUYER_ID,), tenant=True, buyer="buyer",
             links={200: {"pause": Link("pauseBuyer", {"id": "$request.path.id"})}}),
    Endpoint(
        "POST", "/v1/leads/{id}/returns", "returnLead", "A buyer returns a bad lead",
        "leads",
        {200: ok(ReturnResult, "refunded (`replay`: true when it already was)"),
         400: err("the body is not the endpoint's JSON object", *NOT_JSON),
         404: err("no sale of that lead to that buyer", "unknown_sale"),
         409: err("more than 5 days after the sale", "return_window_closed"),
         422: err("a reason not in the list", "reason_not_accepted")},
        body=ReturnBody, params=(LEAD_ID,), tenant=True, buyer="sale",
    ),
    # -- billing -------------------------------------------------------------------------
    Endpoint(
        "POST", ACCOUNT + "/funds", "fundAccount", "Fund an account by card", "billing",
        {201: ok(FundResult, "charged and credited"),
         400: err("refused, nothing moved", *NOT_JSON, "invalid_amount", "amount_too_small",
                  "amount_too_large", "invalid_idempotency_key", "idempotency_conflict",
                  "invalid_config"),
         402: err("every card failed, or the bank wants the cardholder", *CARD_402),
         404: err("no such account", "unknown_account", *STRIPE_404),
         409: err("closed, no card on file, or another charge of the account in flight",
                  "account_closed", "no_payment_method", "busy"),
         502: STRIPE_502, 503: STRIPE_503},
        body=FundBody,
        params=(ACCOUNT_ID, Param(
            "Idempotency-Key", "header",
            {"type": "string", "pattern": f"^({IDEMPOTENCY_KEY_PATTERN[1:-1]})?$"},
            "required unless the body has `idempotency_key` (an empty header is none)")),
        tenant=True, buyer="account", links={201: _ACCOUNT_LINKS},
    ),
    Endpoint("GET", ACCOUNT + "/payment-methods", "listPaymentMethods", "The account's cards",
             "billing", {200: ok(MethodList, "the primary first"), 404: NO_ACCOUNT},
             params=(ACCOUNT_ID,), tenant=True, buyer="account"),
    Endpoint(
        "POST", ACCOUNT + "/payment-methods", "attachPaymentMethod",
        "Attach a card (a PaymentMethod made by Stripe.js)", "billing",
        {201: ok(Method, "attached: the first card is the active primary, later ones "
                         "inactive backups"),
         400: err("not a PaymentMethod id", *NOT_JSON, "invalid_payment_method"),
         402: err("the card was declined at attach", *CARD_402),
         404: err("no such account, or no such PaymentMethod at Stripe", "unknown_account",
                  *STRIPE_404),
         409: err("another charge of the account in flight", "busy"),
         502: STRIPE_502, 503: STRIPE_503},
        body=AttachBody, params=(ACCOUNT_ID,), tenant=True, buyer="account",
        links={201: {
            "activate": Link("activatePaymentMethod",
                             {"id": "$request.path.id", "pm": "$response.body#/id"}),
            "primary": Link("primaryPaymentMethod",
                            {"id": "$request.path.id", "pm": "$response.body#/id"}),
            "deactivate": Link("deactivatePaymentMethod",
                               {"id": "$request.path.id", "pm": "$response.body#/id"}),
            "detach": Link("detachPaymentMethod",
                           {"id": "$request.path.id", "pm": "$response.body#/id"})}},
    ),
    _card("activate", "Activate a backup card"),
    _card("deactivate", "Deactivate a backup card",
          s400=err("the primary cannot be deactivated", "is_primary")),
    _card("primary", "Make a card the primary (and active)"),
    _card("detach", "Detach a card", "DELETE", s502=STRIPE_502, s503=STRIPE_503),
    Endpoint(
        "POST", ACCOUNT + "/refund-balance", "refundBalance",
        "Refund the unused balance to the cards it came from, and close the account",
        "billing",
        {200: ok(BalanceRefund),
         400: err("refused, nothing moved", "negative_balance", "refund_exceeds_charges",
                  "unknown_account"),
         404: NO_ACCOUNT, 409: err("another charge or refund in flight", "busy"),
         502: STRIPE_502, 503: STRIPE_503},
        params=(ACCOUNT_ID,), tenant=True, buyer="account",
    ),
    Endpoint(
        "PUT", ACCOUNT + "/auto-recharge", "setAutoRecharge", "Set auto-recharge", "billing",
        {200: ok(AutoRechargeSettings, "the settings in force"),
         400: err("refused, nothing changed", *NOT_JSON, "invalid_amount", "amount_too_small",
                  "amount_too_large", "threshold_too_small", "invalid_schedule",
                  "invalid_cap", "unknown_account"),
         404: NO_ACCOUNT,
         409: err("enabling needs a card on file", "no_payment_method")},
        body=AutoRecharge, params=(ACCOUNT_ID,), tenant=True, buyer="account",
    ),
    Endpoint(
        "PUT", ACCOUNT + "/alert", "setBalanceAlert", "Set the account's balance alert",
        "billing",
        {200: ok(AlertSettings, "the threshold in force"),
         400: err("refused, nothing changed", *NOT_JSON, "invalid_amount", "alert_too_small",
                  "unknown_account"),
         404: NO_ACCOUNT},
        description=(
            "`balance_alert` (and its e-mail) once when the balance falls below the threshold; "
            "at once when the new threshold lies above the balance. An own threshold "
            "outlives config reloads (docs/billing.md \"Balance alerts\"); `null` puts the "
            "tenant's default (`alert` of the config) back in force."),
        body=AlertBody, params=(ACCOUNT_ID,), tenant=True, buyer="account",
    ),
    Endpoint(
        "POST", "/v1/usage", "recordUsage", "Record one metered usage event", "usage",
        {201: ok(UsageResult, "debited"),
         200: ok(UsageResult, "the event was recorded before: nothing debited again"),
         400: err("refused, nothing moved", *NOT_JSON, "unknown_meter", "invalid_quantity",
                  "invalid_event_id"),
         402: err("the balance cannot cover it without passing the floor",
                  "insufficient_funds"),
         404: err("no such account", "unknown_account"),
         409: err("the account is closed", "account_closed")},
        body=Usage, tenant=True,
    ),
    Endpoint(
        "POST", "/v1/usage/batch", "recordUsageBatch", "Record usage events in a batch",
        "usage",
        {200: ok(UsageBatchResult, "each item's result, in order (a floor refusal is that "
                                   "item's `error`)"),
         400: err("one bad item refuses the batch, nothing moved", *NOT_JSON, "invalid_batch",
                  "unknown_meter", "invalid_quantity", "invalid_event_id"),
         404: err("no such account", "unknown_account")},
        body=BatchBody, tenant=True,
    ),
    Endpoint(
        "GET", ACCOUNT + "/transactions", "listTransactions",
        "Transactions from the SQL archive, filtered, as JSON or CSV", "billing",
        {200: Reply("a page of transactions (JSON), or all of them (CSV, `format=csv`)",
                    TransactionPage, media=(JSON, "text/csv")),
         400: err("a parameter out of its range or unknown", "invalid_query"),
         404: NO_ACCOUNT,
         503: err("the ledger archive is not configured", "unavailable")},
        params=(
            ACCOUNT_ID,
            Param("from", "query", _TEXT, "epoch ms or ISO 8601 (UTC if naive), inclusive; "
                                          "empty: no bound"),
            Param("to", "query", _TEXT, "epoch ms or ISO 8601 (UTC if naive), exclusive; "
                                        "empty: no bound"),
            Param("type", "query", {"type": "string", "enum": [
                "lead", "fee", "usage", "funding", "recharge", "refund", "return",
                "adjustment", ""]}, "a transaction type; empty: every type"),
            Param("q", "query", _TEXT, "case-insensitive substring of process, user or ref"),
            Param("limit", "query", _LIMIT),
            Param("cursor", "query", _TX_CURSOR, "`next_cursor` of the previous page; empty: "
                                                 "the first page"),
            Param("format", "query", {"type": "string", "enum": ["json", "csv"],
                                      "default": "json"}),
        ),
        tenant=True, buyer="account",
        links={200: {"nextPage": Link("listTransactions",
                                      {"id": "$request.path.id",
                                       "cursor": "$response.body#/next_cursor"})}},
    ),
    Endpoint(
        "GET", ACCOUNT + "/overview", "getOverview",
        "Balance, cards, auto-recharge, the newest payments and entries", "billing",
        {200: ok(Overview),
         400: err("the account is not in Redis", "unknown_account"), 404: NO_ACCOUNT},
        params=(ACCOUNT_ID,), tenant=True, buyer="account",
    ),
    # -- portal identities: users, invites, buyer API keys (docs/portal.md) ---------------
    Endpoint(
        "POST", USERS, "createPortalUser", "Create a portal user, with its invite link",
        "portal",
        {201: ok(CreatedUser, "created (status `invited`), with the one-time link that "
                              "sets its password"),
         400: err("refused, nothing stored", *NOT_JSON, "invalid_email", "unknown_account"),
         409: err("the tenant has a user with this e-mail address; an operator with "
                  "accounts", "email_taken", "operator_user"),
         503: NO_IDENTITY},
        description=(
            "The user can reach the client accounts listed (clients of this tenant; "
            "`wallet` never), with its own login once it has set its password through the "
            "invite (`invite_url`, valid `invite_ttl_hours`), and with the buyer API keys "
            "made for it. The invite's token is shown once: only its hash is kept. "
            "`role` `operator`: a login to the portal's operator page (the tenant's "
            "clients, balances, users and mappings, read-only), with no account and no key."),
        body=CreateUserBody, tenant=True, links={201: _USER_LINKS},
    ),
    Endpoint("GET", USERS, "listPortalUsers", "The tenant's portal users", "portal",
             {200: ok(UserList, "oldest first"), 503: NO_IDENTITY}, tenant=True),
    Endpoint("GET", USER, "getPortalUser", "A portal user", "portal",
             {200: ok(PortalUser), 404: NO_USER, 503: NO_IDENTITY},
             params=(USER_ID,), tenant=True),
    Endpoint(
        "PATCH", USER, "updatePortalUser", "Disable or enable a user; replace its accounts",
        "portal",
        {200: ok(PortalUser, "the user as it now is"),
         400: err("refused, nothing changed", *NOT_JSON, "unknown_account"),
         404: NO_USER,
         409: err("accounts for an operator (it has none)", "operator_user"),
         503: NO_IDENTITY},
        description=(
            "`status`: `disabled` (its keys answer 401 and its invite is void until it is "
            "enabled again), `active` (`invited` again when it never set a password). "
            "`accounts` replaces its mappings; a buyer key follows at once (or within "
            "`api_key_cache_s`)."),
        body=UpdateUserBody, params=(USER_ID,), tenant=True,
    ),
    Endpoint(
        "DELETE", USER, "deletePortalUser", "Delete a user and revoke its keys", "portal",
        {200: ok(DeletedUser), 404: NO_USER, 503: NO_IDENTITY},
        params=(USER_ID,), tenant=True,
    ),
    Endpoint(
        "POST", USER + "/invite", "invitePortalUser",
        "A new invite link (the older ones void): a first or a new password", "portal",
        {201: ok(Invitation), 404: NO_USER,
         409: err("the user is disabled: enable it first", "user_disabled"),
         503: NO_IDENTITY},
        params=(USER_ID,), tenant=True,
    ),
    Endpoint(
        "POST", "/v1/portal/invites/{token}", "acceptInvite",
        "Accept an invite: set the user's password", "portal",
        {200: ok(PortalUser, "the password is set, the user `active`; the link is spent"),
         400: err("refused, the link still works", *NOT_JSON, "weak_password"),
         410: err("unknown, used or expired link, or its user disabled or deleted",
                  "invite_invalid"),
         503: NO_IDENTITY},
        description=(
            "No bearer token: the link's token is the credential (one time, "
            "`invite_ttl_hours`). The password: 12 to 256 characters, not containing the "
            "user's e-mail address; it is stored as an argon2id hash only."),
        body=AcceptInviteBody,
        params=(Param("token", "path", _ID, "the token of the invite link", required=True),),
    ),
    Endpoint(
        "POST", USER + "/keys", "createApiKey", "Make a buyer API key for a user", "portal",
        {201: ok(CreatedKey, "the key, shown this once (`key`: `lfk_<id>_<secret>`)"),
         400: err("refused, nothing stored", *NOT_JSON, "invalid_name"),
         404: NO_USER,
         409: err("the user is disabled, is an operator (no keys), or has 20 keys that "
                  "are not revoked", "user_disabled", "operator_user", "too_many_keys"),
         503: NO_IDENTITY},
        description=(
            "The key acts for the user on the account endpoints, for its mapped accounts "
            "only (`Authorization: Bearer lfk_...`). Only its SHA-256 is kept: a lost key "
            "is revoked and replaced, never shown again."),
        body=CreateKeyBody, body_required=False, params=(USER_ID,), tenant=True,
        links={201: {"revoke": Link("revokeApiKey",
                                    {"key_id": "$response.body#/api_key/id"})}},
    ),
    Endpoint("GET", USER + "/keys", "listApiKeys", "A user's API keys (no secret)", "portal",
             {200: ok(KeyList, "oldest first, revoked ones included"), 404: NO_USER,
              503: NO_IDENTITY},
             params=(USER_ID,), tenant=True),
    Endpoint(
        "DELETE", "/v1/portal/keys/{key_id}", "revokeApiKey", "Revoke a buyer API key",
        "portal",
        {200: ok(ApiKeyView, "revoked (a key revoked before: as it was)"),
         404: err("no such key of this tenant", "unknown_key"), 503: NO_IDENTITY},
        params=(KEY_ID,), tenant=True,
    ),
    *NOTIFY_ENDPOINTS,
)


BY_KEY: Mapping[tuple[str, str], Endpoint] = {e.key: e for e in ENDPOINTS}
BY_ID: Mapping[str, Endpoint] = {e.operation_id: e for e in ENDPOINTS}
