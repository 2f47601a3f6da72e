"""The wire shapes of the engine's HTTP API (besides lead ingest and billing): every request
and response body as a msgspec Struct, encoded as it is and described by the OpenAPI
document (engine.api.openapi) from the same classes.

A Struct here imports nothing of the engine: handlers build them, the route table
(engine.api.endpoints) names them. Amounts are decimal strings (money is integers inside);
the ``Money`` annotations only describe them in the document (``extra_json_schema``), they
add no check to decoding: the handlers' own parsing stays the one refusal, with its codes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from engine.core.wire import EntryId, Money, MoneyOut

# ---- errors --------------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct):
    """What went wrong: ``code`` is stable and documented per endpoint, ``message`` is for
    people."""

    code: str
    message: str
    attempt: str | UnsetType = UNSET  # billing's payment_failed: the recorded attempt id


class Error(msgspec.Struct):
    """The one error shape of every endpoint but lead ingest (which answers a LeadResponse)."""

    error: ErrorDetail


# ---- health --------------------------------------------------------------------------------


class Health(msgspec.Struct):
    status: Literal["alive"] = "alive"


class ReadyChecks(msgspec.Struct):
    config: bool
    scripts: bool
    redis: bool
    draining: bool
    failed_workers: list[str]


class Readiness(msgspec.Struct):
    """200 ready, 503 not_ready: Redis reachable, scripts loaded, config loaded, not
    draining, no in-process worker dead."""

    status: Literal["ready", "not_ready"]
    checks: ReadyChecks


# ---- lead ingest (a description only: the hot path decodes the body itself) ----------------


SubId = Annotated[
    Annotated[str, Meta(extra_json_schema={"maxLength": 75})] | int,
    Meta(description="text (at most 75 characters, no control characters) or a JSON integer")]


class LeadPost(msgspec.Struct):
    """A lead in the Lead Prosper direct-post shape. Besides these, the campaign's own
    fields (README "Field types"), validated and normalized per campaign."""

    lp_campaign_id: Annotated[str | int, Meta(description="text, or a JSON integer")]
    lp_supplier_id: Annotated[str | int, Meta(description="text, or a JSON integer")]
    lp_key: Annotated[str, Meta(description="the supplier's key (text only)")]
    lp_action: Annotated[str, Meta(extra_json_schema={
        "pattern": "^([Tt][Ee][Ss][Tt])?$",
        "description": "test (in any case): full validation and routing, no money moves; "
                       "any other value is a field error (422)"})] = ""
    lp_subid1: SubId = ""
    lp_subid2: SubId = ""


class PingBody(LeadPost):
    """A ping (docs/pingpost.md): the credentials and the campaign's ping fields only (no
    personal data); with a campaign dedupe, optionally the dedupe fields hashed
    (``<field>_md5`` / ``<field>_sha256``, hex) for the duplicate check at ping."""


class PostBody(LeadPost):
    """A post of a ping: the full lead (the campaign's fields), the ping's id and, for a
    shared auction, the bids the seller accepts (default: every bid offered)."""

    lp_ping_id: Annotated[str, Meta(description="the ping_id of the ping's answer")] = ""
    bid_ids: Annotated[list[str], Meta(description="shared auction: the bid ids sold")] = []


# ---- accounts ------------------------------------------------------------------------------


class Thresholds(msgspec.Struct):
    alert: MoneyOut
    auto_recharge: MoneyOut | None  # its threshold, or null when off
    min_balance: MoneyOut | None


class AccountView(msgspec.Struct):
    """A client account, or the tenant's platform ``wallet``."""

    id: str
    balance: MoneyOut
    floor: MoneyOut
    status: Literal["active", "paused", "closed"]
    paused_reason: str | None  # floor, min_balance, ... (null unless paused)
    billing: str  # realtime, manual, none
    thresholds: Thresholds
    # ping-post: funds held by open bids (until their post or expiry), and balance - held,
    # which every debit and new hold must keep at or above the floor
    held: MoneyOut = "0.00"
    available: MoneyOut = "0.00"


class LedgerEntry(msgspec.Struct):
    id: EntryId
    account: str | None
    kind: str | None
    delta: MoneyOut
    balance_after: MoneyOut
    lead_id: str | None  # the lead of a lead, fee, refund, return, ... entry (a fee entry
    # of several leads: None; its ref lists them, comma-separated)
    ref: str | None
    time_ms: int
    details: dict[str, str] | UnsetType = UNSET  # the entry's other fields, when it has any


class LedgerPage(msgspec.Struct):
    """Newest first; ``next_before`` pages on (null on the last page)."""

    entries: list[LedgerEntry]
    next_before: str | None


class CreditBody(msgspec.Struct, forbid_unknown_fields=True):
    """A manual credit: a payment the tenant received outside leadflow."""

    amount: Money
    note: str = ""
    reference: str = ""  # the payment received elsewhere (check number, wire id)


class CreditResult(msgspec.Struct):
    balance: MoneyOut
    entry: str
    replay: bool


class ReturnBody(msgspec.Struct, forbid_unknown_fields=True):
    """A buyer returns a bad lead, within 5 days of the sale, for an approved reason:
    disconnected_phone, wrong_number, outside_us_canada, third_party_submission."""

    buyer: str
    reason: str
    note: str = ""


class ReturnResult(msgspec.Struct):
    lead_id: str
    buyer: str
    state: str  # refunded
    refunded: MoneyOut  # the price
    replay: bool


class BuyerAccount(msgspec.Struct):
    """The client account that pays for a buyer's leads."""

    id: str
    status: Literal["active", "paused", "closed", "missing"]
    paused_reason: str | UnsetType = UNSET  # only when paused


class BuyerState(msgspec.Struct):
    id: str
    status: Literal["active", "paused"]
    account: BuyerAccount


# ---- notifications (#19) -------------------------------------------------------------------

# the categories of engine.notify.prefs.CATEGORIES, for the document only (a unit test keeps
# them equal); the handler refuses any other with 400 unknown_category
NOTIFY_CATEGORIES = ("balance", "account", "recharge", "funding", "caps", "webhooks",
                     "returns", "reports")
TemplateText = Annotated[str, Meta(extra_json_schema={
    "maxLength": 65536, "description": "a Jinja2 template, at most 64 KiB in UTF-8"})]
SubjectText = Annotated[str, Meta(extra_json_schema={
    "minLength": 1, "maxLength": 65536,
    "description": "a Jinja2 template of one line (it must not render empty)"})]


class TemplateBody(msgspec.Struct, forbid_unknown_fields=True):
    """A message kind's three templates, all required; each is rendered against the kind's
    sample data before it is stored (400 template_invalid otherwise)."""

    subject: SubjectText
    text: TemplateText
    html: TemplateText


class PreviewBody(msgspec.Struct, forbid_unknown_fields=True):
    """Candidate templates; a part left out is the kind's template in force."""

    subject: SubjectText | UnsetType = UNSET
    text: TemplateText | UnsetType = UNSET
    html: TemplateText | UnsetType = UNSET


class TemplateSource(msgspec.Struct):
    subject: str
    text: str
    html: str


class TemplateSummary(msgspec.Struct):
    kind: str
    category: str
    optional: bool  # a recipient may unsubscribe from its category
    overridden: bool  # the tenant's own templates are in force


class TemplateList(msgspec.Struct):
    templates: list[TemplateSummary]


class TemplateView(msgspec.Struct):
    """The templates in force (the tenant's override, or the default) and the default."""

    kind: str
    category: str
    optional: bool
    overridden: bool
    subject: str
    text: str
    html: str
    default: TemplateSource
    variables: list[str]  # what the templates may use (the sample data's names)


class RenderedMessage(msgspec.Struct):
    """Templates rendered with the kind's sample data."""

    subject: str
    text: str
    html: str


class SampleSent(msgspec.Struct):
    """A test message (the sample data) sent to the tenant's own addresses."""

    sent_to: int
    recipients: list[str]  # the tenant's own operators


Address = Annotated[str, Meta(extra_json_schema={"format": "email", "minLength": 3,
                                                 "maxLength": 254})]


class PreferencesBody(msgspec.Struct, forbid_unknown_fields=True):
    """Categories to turn on (true) or off (false) for one address; the others stay."""

    address: Address
    categories: Annotated[dict[str, bool], Meta(extra_json_schema={
        "propertyNames": {"enum": list(NOTIFY_CATEGORIES)}})]


class Preferences(msgspec.Struct):
    address: str  # trimmed and lower-cased
    categories: dict[str, bool]  # every category


# ---- the portal's identities: users, invites, buyer API keys (docs/portal.md) --------------

Email = Annotated[str, Meta(extra_json_schema={
    "minLength": 3, "maxLength": 254, "examples": ["buyer@example.com"],
    "description": "an e-mail address (stored lower-cased: one user per address and tenant)"})]
AccountIds = Annotated[list[str], Meta(extra_json_schema={
    "maxItems": 100, "description": "client account ids of the tenant (not `wallet`)"})]
KeyName = Annotated[str, Meta(extra_json_schema={
    "maxLength": 100, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",
    "description": "a label of yours, at most 100 characters, no control characters"})]
Password = Annotated[str, Meta(extra_json_schema={
    "minLength": 12, "maxLength": 256,
    "description": "12 to 256 characters, not containing the user's e-mail address"})]
UserStatus = Literal["invited", "active", "disabled"]


class CreateUserBody(msgspec.Struct, forbid_unknown_fields=True):
    """A portal user of the tenant, mapped to some of its client accounts; it gets an invite
    link to set its password."""

    email: Email
    accounts: AccountIds = []
    # operator: the portal's operator page of the tenant (read-only), no account, no key
    role: Literal["buyer", "operator"] = "buyer"


class UpdateUserBody(msgspec.Struct, forbid_unknown_fields=True):
    """``status``: ``disabled`` stops its keys and voids its invite, ``active`` enables it
    again; ``accounts`` replaces its mappings. A field left out is left as it is."""

    status: Literal["active", "disabled"] | UnsetType = UNSET
    accounts: AccountIds | UnsetType = UNSET


class PortalUser(msgspec.Struct):
    id: str
    email: str
    status: UserStatus  # invited: no password set yet
    accounts: list[str]
    created_ms: int
    updated_ms: int
    role: Literal["buyer", "operator"] = "buyer"


class UserList(msgspec.Struct):
    data: list[PortalUser]


class Invitation(msgspec.Struct):
    """A one-time link to set the password: send it to the user yourself (shown once)."""

    invite_url: str  # /portal/invite/<token>, relative to the engine's URL
    invite_token: str
    expires_ms: int


class CreatedUser(msgspec.Struct):
    user: PortalUser
    invite: Invitation


class DeletedUser(msgspec.Struct):
    id: str
    deleted: bool
    keys_revoked: int


class AcceptInviteBody(msgspec.Struct, forbid_unknown_fields=True):
    password: Password


class CreateKeyBody(msgspec.Struct, forbid_unknown_fields=True):
    name: KeyName = ""


class ApiKeyView(msgspec.Struct):
    """A buyer API key, without its secret (shown once, at creation)."""

    id: str
    user_id: str
    name: str
    prefix: str  # lfk_<id>_<4 characters>: to tell keys apart
    created_by: str  # "tenant", or the portal user who made it
    created_ms: int
    last_used_ms: int | None  # to the minute
    revoked_ms: int | None


class CreatedKey(msgspec.Struct):
    """The new key: ``key`` is shown this once and never again (only its hash is kept)."""

    key: str
    api_key: ApiKeyView


class KeyList(msgspec.Struct):
    data: list[ApiKeyView]
