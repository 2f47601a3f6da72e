"""Config shapes (msgspec Structs): what a config file holds, nothing more.

A config file is TOML: top-level arrays ``tenants``, ``clients``, ``suppliers``, ``campaigns``
and ``buyers`` plus a ``[settings]`` table. Money is always a decimal string (``"25.00"``);
secrets are literals or ``"env:NAME"`` references resolved from the environment at load.
Reading and checking a file is :mod:`engine.run.configfile`'s.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from engine.core import money
from engine.core.billing_errors import MoneyError
from engine.core.constants import DEFAULT_FLOOR
from engine.core.errors import ConfigError

Id = str
FieldType = Literal[
    "text", "number", "email", "phone", "state", "zip", "list", "dob", "ip", "url", "bool"
]
Distribution = Literal[
    "waterfall", "round_robin", "weighted_round_robin", "highest_price", "send_to_all", "exclusive"
]
BillingMode = Literal["none", "manual", "realtime"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[str, ...] = get_args(Weekday)  # Monday first, as date.weekday()

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # whole string: fullmatch


# fields whose values are secrets or may carry them (a URL's user info or query): a repr
# (a log line's %r, a debugger, a failed assertion) shows them as '***'
_SECRET_FIELDS = frozenset({"api_token", "key", "secret", "headers", "url", "redis_url",
                            "sql_url", "password", "api_key"})


class _Shape(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    def __repr__(self) -> str:
        parts = (f"{f}={'***' if f in _SECRET_FIELDS else repr(getattr(self, f))}"
                 for f in self.__struct_fields__)
        return f"{type(self).__name__}({', '.join(parts)})"


class Field(_Shape, kw_only=True):
    """One campaign field. ``min``/``max`` bound numbers; ``min_age``/``max_age`` bound dob."""

    name: str
    type: FieldType = "text"
    required: bool = False
    max_length: int = 255
    min: int | str | None = None
    max: int | str | None = None
    values: list[str] = []
    min_age: int | None = None
    max_age: int | None = None


class Dedupe(_Shape, kw_only=True):
    fields: list[str]
    match: Literal["all", "any"] = "all"
    days: int = 30
    scope: Literal["campaign", "buyer"] = "campaign"


class Margin(_Shape, kw_only=True):
    """The tenant's cut of a bid: the seller is offered the bid less this (ping-post)."""

    percent: str | None = None  # "20" = 20 % of the bid (rounded down to the micro)
    fixed: str | None = None  # a fixed amount, e.g. "2.50"


class PingPost(_Shape, kw_only=True):
    """A campaign's ping-post exchange (docs/pingpost.md)."""

    ping_fields: list[str] = []  # the campaign fields sent at ping (no personal data)
    ping_deadline_ms: int = 750  # every bid is collected within this
    ping_ttl_s: int = 60  # a ping (and its holds) expires after this
    auction: Literal["exclusive", "shared"] = "exclusive"
    sell_limit: int = 3  # shared: at most this many bids sold
    margin: Margin = msgspec.field(default_factory=Margin)
    min_bid: str = "0.00"  # bids below this are dropped
    # with a campaign dedupe: the hashes a seller may send at ping (``<field>_md5``,
    # ``<field>_sha256``) for the duplicate check there; each is one more dedupe mark per
    # sale (docs/pingpost.md, "Duplicates at ping"). [] turns the check off
    dedupe_hashes: list[Literal["md5", "sha256"]] = msgspec.field(
        default_factory=lambda: ["md5", "sha256"])


class Campaign(_Shape, kw_only=True):
    id: Id
    tenant: Id
    name: str = ""
    timezone: str | None = None  # default: the tenant's
    distribution: Distribution = "waterfall"
    sell_limit: int = 3  # send_to_all: at most N buyers ("shared" leads, 3 by default)
    fields: list[Field] = []
    dedupe: Dedupe | None = None
    mode: Literal["async", "sync"] = "async"
    sync_deadline_ms: int = 5_000
    ping_post: PingPost | None = None  # None: direct post only


class Filter(_Shape, kw_only=True):
    """A buyer filter on one field; every filter of a buyer must pass.

    op ``in``: equals one of ``values`` (case-insensitive); ``regex``: ``pattern`` matches;
    ``range``: ``min`` <= number <= ``max``; ``states``/``zips``: the normalized value is in
    ``values`` (ZIP entries may be 3-digit prefixes). ``action = "block"`` inverts the test.
    """

    field: str
    op: Literal["in", "regex", "range", "states", "zips"] = "in"
    values: list[str] = []
    pattern: str | None = None
    min: int | str | None = None
    max: int | str | None = None
    action: Literal["allow", "block"] = "allow"


class Caps(_Shape, kw_only=True):
    """Lead-count caps per window and spend caps; windows in the campaign's time zone."""

    hour: int | None = None
    day: int | None = None
    week: int | None = None
    month: int | None = None
    total: int | None = None
    spend_day: str | None = None
    spend_month: str | None = None
    weekday: dict[str, int] = {}  # per-weekday daily cap, e.g. {sat = 10}


class Schedule(_Shape, kw_only=True):
    """When a buyer takes leads: weekdays and an ``HH:MM``-``HH:MM`` window, campaign tz."""

    days: list[str] = msgspec.field(default_factory=lambda: list(WEEKDAYS))
    start: str = "00:00"
    end: str = "24:00"


class ResponseRule(_Shape, kw_only=True):
    """One response rule of a buyer's webhook; every condition given must hold (AND).

    ``status``: the HTTP status is one of these; ``path`` + ``equals``: the JSON value at a
    dotted path (``"result"``, ``"data.items.0.status"``) equals this text (case-insensitive;
    JSON ``true`` is ``"true"``); ``path`` alone: the path exists and is not null/false/"";
    ``contains``: the body contains this text; ``regex``: the pattern matches (search) the body.
    A rule list matches when any of its rules matches (OR). See docs/delivery.md.
    """

    status: list[int] = []
    path: str | None = None
    equals: str | None = None
    contains: str | None = None
    regex: str | None = None


class Delivery(_Shape, kw_only=True):
    """How a buyer receives its leads (webhook). See docs/delivery.md.

    Request: ``method``/``format``/``template``/``headers`` (values may be ``env:NAME``),
    signed with ``secret`` (Standard Webhooks). Verdict: ``duplicate`` rules, then ``accept``
    rules (empty: any 2xx is accepted); anything else is rejected; 5xx, 429, timeouts and
    network errors are retried. Optional real-time price at ``price_path``, capped at
    ``max_price`` (default: the buyer's configured price). Retry policy: at most
    ``max_attempts`` attempts within ``max_age_s`` of the sale, exponential backoff with full
    jitter from ``retry_base_ms`` up to ``retry_max_ms``; Retry-After is honoured. The
    circuit breaker opens after ``breaker_failures`` consecutive failures for
    ``breaker_cooldown_s``.
    """

    url: str
    method: Literal["POST", "PUT", "GET"] = "POST"
    format: Literal["json", "form"] = "json"
    template: dict[str, str] = {}  # outgoing name -> "{field}" or a static value
    headers: dict[str, str] = {}  # values may be "env:NAME"; never logged
    timeout_ms: int = 5_000
    secret: str = ""  # Standard Webhooks secret ("whsec_..." or env:NAME)
    accept: list[ResponseRule] = []  # empty: any 2xx is accepted
    duplicate: list[ResponseRule] = []
    price_path: str | None = None  # real-time price read from the response
    max_price: str | None = None
    max_attempts: int = 8
    max_age_s: int = 6 * 3_600
    retry_base_ms: int = 1_000
    retry_max_ms: int = 300_000
    breaker_failures: int = 10
    breaker_cooldown_s: int = 30


class Ping(_Shape, kw_only=True):
    """A ping buyer's bid endpoint: the ping fields are POSTed as JSON, signed with
    ``secret`` (Standard Webhooks); the bid is read from the answer at ``bid_path`` (a
    JSON path, as delivery verdict rules) or as the first group of ``bid_regex`` (RE2).
    Without ``url``: a fixed-price buyer, bidding its ``price`` with no request."""

    url: str | None = None
    secret: str = ""
    timeout_ms: int = 500
    bid_path: str | None = None
    bid_regex: str | None = None
    headers: dict[str, str] = {}
    margin: Margin | None = None  # this buyer's margin, instead of the campaign's


class Buyer(_Shape, kw_only=True):
    id: Id
    tenant: Id
    campaign: Id
    client: Id  # the client account that pays for this buyer's leads
    price: str
    priority: int = 1
    weight: int = 1
    status: Literal["active", "paused"] = "active"
    filters: list[Filter] = []
    caps: Caps = msgspec.field(default_factory=Caps)
    schedule: Schedule | None = None
    delivery: Delivery | None = None
    ping: Ping | None = None  # a ping-post campaign's bidder (None: it does not bid)


class AutoRecharge(_Shape, kw_only=True):
    enabled: bool = False
    threshold: str = "20.00"  # at least $20.00
    amount: str = "100.00"  # at least $100.00
    every_days: int | None = None  # a schedule instead of a threshold
    max_per_day: int = 3
    max_amount_per_day: str = "1000.00"


class Account(_Shape, kw_only=True):
    """Settings shared by client accounts and the tenant wallet."""

    opening_balance: str = "0.00"
    floor: str = money.format(DEFAULT_FLOOR)
    alert: str = "20.00"  # balance_alert below this, at least $1.00
    min_balance: str | None = None
    auto_recharge: AutoRecharge = msgspec.field(default_factory=AutoRecharge)


class Client(Account, kw_only=True):
    id: Id
    tenant: Id
    name: str = ""
    billing: BillingMode = "manual"
    contacts: list[str] = []  # e-mail addresses of the client's notifications (#19)


class Fees(_Shape, kw_only=True):
    inbound_lead: str = "0.00"  # per valid, new, live lead decided (sold or not): tenant wallet
    outbound_delivery: str = "0.00"  # per sold delivery
    inbound_ping: str = "0.00"  # per ping decided (test pings: none): tenant wallet
    outbound_ping: str = "0.00"  # per bid request sent to a buyer: tenant wallet
    card_fee_percent: str = "0"  # passed to buyers on card funding, 0 to 15


class Smtp(_Shape, kw_only=True):
    """The SMTP server a tenant's e-mail notifications go through (engine.notify)."""

    host: str
    port: int = 587
    security: Literal["starttls", "tls", "plain"] = "starttls"
    username: str | None = None
    password: str | None = None  # literal or env:NAME; never logged
    sender: str  # the From address, e.g. "Acme Leads <billing@acme.example>"
    timeout_s: float = 30.0


class WeeklyReport(_Shape, kw_only=True):
    """The weekly report e-mail (engine.notify.weekly), sent at ``day`` ``at`` in the
    tenant's time zone for the seven days before ``day``."""

    enabled: bool = True
    day: Weekday = "mon"
    at: Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]\Z")] = "09:00"


class TenantWebhook(_Shape, kw_only=True):
    """The tenant's own webhook for its events stream (engine.delivery.tenant_hooks)."""

    url: str
    secret: str = ""  # whsec_<base64>, literal or env:NAME; required by the config check
    events: list[str] = []  # event types sent; empty: every type
    timeout_ms: int = 5_000


class SendGrid(_Shape, kw_only=True):
    """SendGrid's v3 Web API (mail send), which a tenant's e-mail notifications go through
    instead of SMTP (engine.notify.sendgrid)."""

    api_key: str  # literal or env:NAME; never logged
    sender: str  # the From address, e.g. "Acme Leads <billing@acme.example>"
    base_url: str = "https://api.sendgrid.com"  # the EU region: https://api.eu.sendgrid.com
    timeout_s: float = 30.0


class Notify(_Shape, kw_only=True):
    """A tenant's e-mail notifications, through ``smtp`` or ``sendgrid`` (not both; with
    neither, no e-mail), and its own ``webhook``."""

    smtp: Smtp | None = None
    sendgrid: SendGrid | None = None
    webhook: TenantWebhook | None = None
    operators: list[str] = []  # the tenant's own addresses (wallet, webhooks)
    weekly_report: WeeklyReport = msgspec.field(default_factory=WeeklyReport)


class Tenant(_Shape, kw_only=True):
    id: Id
    name: str = ""
    api_token: str  # bearer token of the tenant's API; literal or env:NAME
    timezone: str = "UTC"
    pii_retention_days: int = 30  # personal fields of the lead archive erased after this
    fees: Fees = msgspec.field(default_factory=Fees)
    wallet: Account = msgspec.field(default_factory=Account)
    meters: dict[str, str] = {}  # metered service -> unit price
    notify: Notify = msgspec.field(default_factory=Notify)


class Supplier(_Shape, kw_only=True):
    id: Id
    tenant: Id
    key: str  # the lp_key sellers post with; literal or env:NAME
    name: str = ""
    payout: str = "0.00"
    test_mode: bool = False
    campaigns: list[Id] = []  # empty: every campaign of the tenant


class Settings(_Shape, kw_only=True):
    redis_url: str | None = None  # none: the embedded redis-server
    # relative: to the config file's directory (made absolute by load)
    state_dir: str = ".leadflow"
    host: str = "127.0.0.1"
    port: int = 8080
    appendfsync: Literal["everysec", "always"] = "everysec"
    batch_max: int = 64  # leads per Lua call
    batch_inflight: int = 2  # Lua calls in flight at once per tenant
    max_body_bytes: int = 64 * 1024
    max_batch_body_bytes: int = 8 * 1024 * 1024
    idempotency_ttl_s: int = 86_400
    replay_window_s: int = 60
    sql_url: str | None = None  # a relative SQLite file: to the config file's directory
    # the HTTP server's limits (engine.api.server; README, "Connection limits")
    header_timeout_s: float = 10.0  # request line and headers, from connect or first byte
    body_timeout_s: float = 30.0  # the whole body, from the end of the headers
    keepalive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 1024  # open connections; past it: 503 (uvicorn limit_concurrency)
    max_header_bytes: int = 32 * 1024  # request line and headers together
    max_headers: int = 100
    # where the engine is reached from outside (e.g. "https://leads.acme.example"): the
    # base of e-mails' unsubscribe links (engine.notify.prefs); none: no links
    public_url: str | None = None
    # portal identities (engine.identity; docs/portal.md)
    invite_ttl_hours: int = 72  # an invite link works this long (1 to 720)
    api_key_cache_s: float = 0.0  # a buyer key's resolution kept per process (0 to 60; 0: none)
    # the browser portal (engine.portal; docs/portal.md "The portal")
    session_hours: int = 12  # a login lasts this long at most (absolute; 1 to 720)
    session_idle_minutes: int = 30  # and ends after this long without a request (1 to 1440)
    login_max_failures: int = 5  # wrong passwords in a row that lock a user (1 to 100)
    login_lock_minutes: int = 15  # for this long (1 to 1440)
    # Stripe.js for card entry (the tests point it at localstripe's fake one) and the
    # publishable key it runs with (pk_...; literal or env:NAME; empty: no card entry)
    stripe_js_url: str = "https://js.stripe.com/v3/"
    stripe_publishable_key: str = ""


class Config(_Shape, kw_only=True):
    settings: Settings = msgspec.field(default_factory=Settings)
    tenants: list[Tenant] = []
    clients: list[Client] = []
    suppliers: list[Supplier] = []
    campaigns: list[Campaign] = []
    buyers: list[Buyer] = []
    source: str = ""

    def tenant(self, tenant_id: str) -> Tenant:
        return next(t for t in self.tenants if t.id == tenant_id)




def resolve_secret(value: str) -> str:
    """``env:NAME`` -> the environment variable's value (empty when unset); else the literal."""
    if value.startswith("env:"):
        return os.environ.get(value[4:], "")
    return value


def micros(value: str, source: str, path: str) -> int:
    """A config money string in micros, or ConfigError naming where it is."""
    try:
        return money.parse(value, field=path)
    except MoneyError as exc:
        raise ConfigError(source, path, str(exc)) from exc


def zone(name: str, source: str, path: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(source, path, f"unknown time zone {name!r}") from exc


def valid_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))  # not match + "$": "$" also matches before a final "\n"
