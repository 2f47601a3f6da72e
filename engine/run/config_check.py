"""Cross-reference and rule checks of a decoded :class:`~engine.core.config.Config`.

Every problem raises :class:`~engine.core.errors.ConfigError` with the file, a path such as
``buyers[2].caps.spend_day`` and the reason, so ``leadflow config check`` points at the line
to fix. Product minimums come from the help pages our users know (shared/seeds).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

from billing import policy
from engine.core import money
from engine.core.billing_errors import BillingError, MoneyError
from engine.core.config import (
    WEEKDAYS,
    Account,
    AutoRecharge,
    Buyer,
    Campaign,
    Config,
    Margin,
    Notify,
    ResponseRule,
    SendGrid,
    TenantWebhook,
    resolve_secret,
    valid_id,
    zone,
)
from engine.core.constants import DEFAULT_FLOOR, WALLET
from engine.core.errors import ConfigError
from engine.core.untrusted import valid_address
from engine.delivery import DeliveryError
from engine.delivery.bid import BidReader
from engine.delivery.payload import RequestBuilder
from engine.delivery.signing import Signer, SigningError
from engine.delivery.verdict import ResponseMapper
from engine.identity.credentials import KEY_PREFIX
from engine.routing.runtime import Runtime

MAX_CARD_FEE_BP = 1_500  # pass-through card fee: up to 15%
MAX_SYNC_DEADLINE_MS = 60_000  # a seller waits at most a minute for a sync-mode answer
MAX_TIMEOUT_MS = 30_000  # a buyer webhook request: half the worker's 60 s claim-idle time
# Smooth weighted round robin is unrolled to one rotation entry per unit of weight, and
# every lead of the campaign sends its rotation to decide.lua (about 5 us of Python per 100
# entries, plus the Lua loop): weights 1 to 100, at most 1000 entries per campaign.
MAX_WEIGHT = 100
MAX_ROTATION = 1_000
# Lifetimes decide.lua gives keys with SET ... EX after the debit: one Redis refuses would
# fail every lead of the campaign (each taken back whole and answered ERROR 1050).
MAX_DEDUPE_DAYS = 3_650
MAX_HTTP_TIMEOUT_S = 3600  # the HTTP server's timeouts (engine.api.server)
MAX_INVITE_TTL_HOURS = 720  # 30 days: an invite link is a password for whoever holds it
MAX_KEY_CACHE_S = 60  # a revoked buyer key may work this long in a process, at most
MAX_TTL_S = {"idempotency_ttl_s": 30 * 86_400, "replay_window_s": 86_400}
MAX_PORT = 65_535  # a TCP port; 0 binds any free one (the URL is logged at start)
MAX_PING_DEADLINE_MS = 10_000  # a seller's ping waits at most this for bids
MAX_PING_TTL_S = 3_600  # a ping and its holds live at most an hour
# never sent at ping (docs/pingpost.md): personal data goes to the winner with the post
PERSONAL_TYPES = frozenset({"email", "phone", "dob", "ip"})
PERSONAL_NAMES = frozenset({"name", "first_name", "last_name", "full_name", "address",
                            "street", "address1", "address2", "email", "phone", "dob", "ssn"})
MAX_PII_RETENTION_DAYS = 3_650  # the lead archive keeps personal fields at most this long
MAX_COOLDOWN_S = 86_400  # a buyer's open circuit breaker (a key with PX), at most a day
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HEADER_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_EVENT_TYPE = re.compile(r"[a-z][a-z_]{0,39}")
MAX_MAIL_TIMEOUT_S = 300  # an SMTP session or a SendGrid request
MAX_PUBLIC_URL = 200  # with a token, an unsubscribe link stays within a mail header line
_PUBLIC_URL = re.compile(r"^https?://[^\s<>\"\\\x00-\x1f\x7f-\U0010ffff]+\Z")


def valid_public_url(value: str) -> bool:
    """The base of links in e-mails: ``http(s)://host[:port][/path]``, printable ASCII, no
    query, fragment or user info (it goes into a mail header as it is)."""
    if len(value) > MAX_PUBLIC_URL or not _PUBLIC_URL.fullmatch(value):
        return False
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return False
    return bool(parts.hostname) and not parts.query and not parts.fragment \
        and "@" not in parts.netloc and "?" not in value and "#" not in value


def valid_sender(value: str) -> bool:
    """An address, or ``Display Name <address>`` (no line breaks)."""
    if _HEADER_CTL.search(value):
        return False
    name, addr = parseaddr(value)
    return bool(addr) and valid_address(addr) and (bool(name) or addr == value.strip())


class _Checker:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.src = cfg, cfg.source

    def fail(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.src, path, reason)

    def money(self, value: str, path: str) -> int:
        try:
            return money.parse(value, field=path)
        except MoneyError as exc:
            raise self.fail(path, str(exc).split(": ", 1)[-1]) from exc

    def ids(self, items: Iterable[Any], section: str, *, scope_tenant: bool) -> None:
        seen: set[tuple[str, str]] = set()
        for i, item in enumerate(items):
            ident, tenant = item.id, getattr(item, "tenant", "")
            if not valid_id(ident):
                raise self.fail(
                    f"{section}[{i}].id",
                    f"{ident!r} is not a valid id (letters, digits, '_', '-', '.'; at most 64)",
                )
            key = (tenant if scope_tenant else "", ident)
            if key in seen:
                raise self.fail(f"{section}[{i}].id", f"duplicate id {ident!r}")
            seen.add(key)

    def account(self, acct: Account, path: str, billing: str = "manual") -> None:
        opening = self.money(acct.opening_balance, f"{path}.opening_balance")
        floor = self.money(acct.floor, f"{path}.floor")
        if floor > 0:
            raise self.fail(f"{path}.floor", "the floor must be zero or negative")
        if floor < DEFAULT_FLOOR:  # seed 000: "max negative accrual is -$20.00"
            raise self.fail(f"{path}.floor", "at most $20.00 below zero (-20.00)")
        if billing != "none" and opening < floor:  # it would start below it: reconcile fails
            raise self.fail(f"{path}.opening_balance",
                            f"{money.format(opening)} is below the floor {money.format(floor)}")
        alert = self.money(acct.alert, f"{path}.alert")
        if 0 < alert < policy.MIN_ALERT or alert < 0:
            raise self.fail(f"{path}.alert", "balance alerts start at $1.00 (or 0 to disable)")
        if acct.min_balance is not None and self.money(acct.min_balance, f"{path}.min_balance") < 0:
            raise self.fail(f"{path}.min_balance", "must not be negative")
        self.auto_recharge(acct.auto_recharge, f"{path}.auto_recharge")

    def auto_recharge(self, ar: AutoRecharge, path: str) -> None:
        """The billing API's rule (PUT /auto-recharge), so a config never holds settings the
        API would refuse: seed 000's minimums ($20.00 threshold, $100.00 amount, whole
        cents), every_days 1 to 366, max_per_day 1 to 100, max_amount_per_day at least one
        amount. Enabled or not, as the API checks them."""
        for name in ("threshold", "amount", "max_amount_per_day"):  # each with its own path
            self.money(getattr(ar, name), f"{path}.{name}")
        try:
            policy.validate(ar)
        except BillingError as exc:  # "max_per_day: 1 to 100"
            name, sep, reason = str(exc).partition(": ")
            if sep and name in AutoRecharge.__struct_fields__:
                raise self.fail(f"{path}.{name}", reason) from exc
            raise self.fail(path, str(exc)) from exc

    def tenants(self) -> None:
        self.ids(self.cfg.tenants, "tenants", scope_tenant=False)
        token_owner: dict[str, str] = {}
        for i, t in enumerate(self.cfg.tenants):
            p = f"tenants[{i}]"
            zone(t.timezone, self.src, f"{p}.timezone")
            if not 1 <= t.pii_retention_days <= MAX_PII_RETENTION_DAYS:
                raise self.fail(f"{p}.pii_retention_days",
                                f"1 to {MAX_PII_RETENTION_DAYS} days")
            token = resolve_secret(t.api_token)
            if not token:
                raise self.fail(f"{p}.api_token", "empty (is its environment variable set?)")
            # a token names its tenant: a shared one would let one tenant act as the other
            if token in token_owner:
                raise self.fail(f"{p}.api_token",
                                f"the same token as tenant {token_owner[token]!r}")
            token_owner[token] = t.id
            if token.startswith(KEY_PREFIX):  # the API reads such a bearer token as a buyer key
                raise self.fail(f"{p}.api_token",
                                f"must not start with {KEY_PREFIX!r} (buyer API keys do)")
            for fee in ("inbound_lead", "outbound_delivery", "inbound_ping", "outbound_ping"):
                if self.money(getattr(t.fees, fee), f"{p}.fees.{fee}") < 0:
                    raise self.fail(f"{p}.fees.{fee}", "a fee must not be negative")
            try:
                bp = money.parse_percent(t.fees.card_fee_percent)
            except MoneyError as exc:
                raise self.fail(f"{p}.fees.card_fee_percent", str(exc)) from exc
            if bp > MAX_CARD_FEE_BP:
                raise self.fail(f"{p}.fees.card_fee_percent", "at most 15%")
            if t.wallet.min_balance is not None:
                # seed 001: a minimum balance pauses a *buyer's* campaigns; the tenant's own
                # wallet (seed 000) routes down to its floor, with alerts and auto-recharge
                raise self.fail(f"{p}.wallet.min_balance",
                                "a minimum balance is for clients only: the platform wallet "
                                "pays fees down to its floor (use alert or auto_recharge)")
            self.account(t.wallet, f"{p}.wallet")
            for meter, price in t.meters.items():
                if self.money(price, f"{p}.meters.{meter}") <= 0:
                    raise self.fail(f"{p}.meters.{meter}", "unit price must be positive")
            self.notify(t.notify, f"{p}.notify")
            self.tenant_webhook(t.notify.webhook, f"{p}.notify.webhook")

    def addresses(self, values: list[str], path: str) -> None:
        for j, addr in enumerate(values):
            if not valid_address(addr):
                raise self.fail(f"{path}[{j}]", f"{addr!r} is not an e-mail address")

    def notify(self, n: Notify, p: str) -> None:
        self.addresses(n.operators, f"{p}.operators")
        if n.smtp is not None and n.sendgrid is not None:
            raise self.fail(f"{p}.sendgrid", "e-mail goes through smtp or sendgrid, not both: "
                            "remove one of the two tables")
        if n.sendgrid is not None:
            self.sendgrid(n.sendgrid, f"{p}.sendgrid")
        if n.smtp is None:
            return
        s, sp = n.smtp, f"{p}.smtp"
        if not s.host.strip() or _HEADER_CTL.search(s.host) or " " in s.host:
            raise self.fail(f"{sp}.host", "a host name or address")
        if not 1 <= s.port <= MAX_PORT:
            raise self.fail(f"{sp}.port", f"1 to {MAX_PORT}")
        if not valid_sender(s.sender):
            raise self.fail(f"{sp}.sender",
                            "an e-mail address, or 'Name <address>', on one line")
        if not 0 < s.timeout_s <= MAX_MAIL_TIMEOUT_S:
            raise self.fail(f"{sp}.timeout_s",
                            f"more than 0 and at most {MAX_MAIL_TIMEOUT_S} seconds")
        if (s.username is None) != (s.password is None):
            raise self.fail(f"{sp}.password" if s.password is None else f"{sp}.username",
                            "a username needs a password, and a password a username")
        if s.password is not None and not resolve_secret(s.password):
            raise self.fail(f"{sp}.password", "empty (is its environment variable set?)")

    def sendgrid(self, g: SendGrid, p: str) -> None:
        key = resolve_secret(g.api_key)
        if not key:
            raise self.fail(f"{p}.api_key", "empty (is its environment variable set?)")
        if _HEADER_CTL.search(key) or " " in key:  # the key never shows in the reason
            raise self.fail(f"{p}.api_key", "not an API key: it holds spaces or control "
                            "characters")
        if not valid_sender(g.sender):
            raise self.fail(f"{p}.sender", "an e-mail address, or 'Name <address>', on one line")
        try:
            parts = urlsplit(g.base_url)
            _ = parts.port
        except ValueError as exc:
            raise self.fail(f"{p}.base_url", f"not an http(s) URL with a host: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname \
                or parts.username is not None or parts.password is not None \
                or parts.query or parts.fragment or parts.path.strip("/"):
            raise self.fail(f"{p}.base_url", "an http(s) URL with a host and nothing else, "
                            "e.g. https://api.sendgrid.com")
        if not 0 < g.timeout_s <= MAX_MAIL_TIMEOUT_S:
            raise self.fail(f"{p}.timeout_s",
                            f"more than 0 and at most {MAX_MAIL_TIMEOUT_S} seconds")

    def tenant_of(self, path: str, tenant: str) -> None:
        if not any(t.id == tenant for t in self.cfg.tenants):
            raise self.fail(f"{path}.tenant", f"unknown tenant {tenant!r}")

    def clients(self) -> None:
        self.ids(self.cfg.clients, "clients", scope_tenant=True)
        for i, c in enumerate(self.cfg.clients):
            p = f"clients[{i}]"
            self.tenant_of(p, c.tenant)
            if c.id == WALLET:
                raise self.fail(f"{p}.id", f"{WALLET!r} is reserved for the tenant wallet")
            self.account(c, p, c.billing)
            self.addresses(c.contacts, f"{p}.contacts")

    def suppliers(self) -> None:
        self.ids(self.cfg.suppliers, "suppliers", scope_tenant=False)
        campaigns = {(c.tenant, c.id) for c in self.cfg.campaigns}
        for i, s in enumerate(self.cfg.suppliers):
            p = f"suppliers[{i}]"
            self.tenant_of(p, s.tenant)
            if not resolve_secret(s.key):
                raise self.fail(f"{p}.key", "empty (is its environment variable set?)")
            self.money(s.payout, f"{p}.payout")
            for j, cid in enumerate(s.campaigns):
                if (s.tenant, cid) not in campaigns:
                    raise self.fail(f"{p}.campaigns[{j}]", f"unknown campaign {cid!r}")

    def campaigns(self) -> None:
        self.ids(self.cfg.campaigns, "campaigns", scope_tenant=False)
        for i, c in enumerate(self.cfg.campaigns):
            p = f"campaigns[{i}]"
            self.tenant_of(p, c.tenant)
            if c.timezone:
                zone(c.timezone, self.src, f"{p}.timezone")
            names = [f.name for f in c.fields]
            for j, f in enumerate(c.fields):
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", f.name) or f.name.startswith(
                    "lp_"
                ):
                    raise self.fail(f"{p}.fields[{j}].name", f"invalid field name {f.name!r}")
                if names.count(f.name) > 1:
                    raise self.fail(f"{p}.fields[{j}].name", f"duplicate field {f.name!r}")
                if f.type == "list" and not f.values:
                    raise self.fail(f"{p}.fields[{j}].values", "a list field needs values")
            if c.sell_limit < 1:
                raise self.fail(f"{p}.sell_limit", "at least 1")
            if not 1 <= c.sync_deadline_ms <= MAX_SYNC_DEADLINE_MS:
                raise self.fail(f"{p}.sync_deadline_ms",
                                f"between 1 and {MAX_SYNC_DEADLINE_MS} milliseconds")
            if c.mode == "sync" and c.distribution == "send_to_all":
                raise self.fail(f"{p}.mode", "sync mode sells to one buyer at a time; "
                                "send_to_all campaigns are async only")
            if c.ping_post is not None:
                self.ping_post(c, f"{p}.ping_post")
            if c.dedupe is not None:
                for j, name in enumerate(c.dedupe.fields):
                    if name not in names:
                        raise self.fail(f"{p}.dedupe.fields[{j}]", f"unknown field {name!r}")
                if not 1 <= c.dedupe.days <= MAX_DEDUPE_DAYS:
                    raise self.fail(f"{p}.dedupe.days", f"1 to {MAX_DEDUPE_DAYS} days")

    def buyers(self) -> None:
        self.ids(self.cfg.buyers, "buyers", scope_tenant=True)
        clients = {(c.tenant, c.id) for c in self.cfg.clients}
        campaigns = {(c.tenant, c.id): c for c in self.cfg.campaigns}
        rotation: dict[tuple[str, str], int] = {}  # weighted_round_robin campaign -> sum
        for i, b in enumerate(self.cfg.buyers):
            p = f"buyers[{i}]"
            self.tenant_of(p, b.tenant)
            if (b.tenant, b.client) not in clients:
                raise self.fail(f"{p}.client", f"unknown client {b.client!r}")
            campaign = campaigns.get((b.tenant, b.campaign))
            if campaign is None:
                raise self.fail(f"{p}.campaign", f"unknown campaign {b.campaign!r}")
            if self.money(b.price, f"{p}.price") < 0:
                raise self.fail(f"{p}.price", "must not be negative")
            if not 1 <= b.weight <= MAX_WEIGHT:
                raise self.fail(f"{p}.weight", f"1 to {MAX_WEIGHT}")
            if campaign.distribution == "weighted_round_robin":
                key = (b.tenant, b.campaign)
                rotation[key] = total = rotation.get(key, 0) + b.weight
                if total > MAX_ROTATION:
                    raise self.fail(f"{p}.weight", (
                        f"the weights of campaign {b.campaign!r} add up to {total}; at most "
                        f"{MAX_ROTATION} in a weighted_round_robin campaign (its rotation has "
                        "one entry per unit of weight and goes with every lead): use smaller "
                        "weights in the same proportions"))
            names = {f.name for f in campaign.fields}
            for j, flt in enumerate(b.filters):
                if flt.field not in names:
                    raise self.fail(f"{p}.filters[{j}].field", f"unknown field {flt.field!r}")
            for name in ("spend_day", "spend_month"):
                value = getattr(b.caps, name)
                if value is not None and self.money(value, f"{p}.caps.{name}") < 0:
                    raise self.fail(f"{p}.caps.{name}", "must not be negative")  # = no cap
            for day, cap in b.caps.weekday.items():
                if day not in WEEKDAYS:
                    raise self.fail(f"{p}.caps.weekday.{day}", "use mon, tue, ... sun")
                if cap < 0:  # decide.lua reads a negative limit as "no cap"
                    raise self.fail(f"{p}.caps.weekday.{day}", "must not be negative")
            for name in ("hour", "day", "week", "month", "total"):
                value = getattr(b.caps, name)
                if value is not None and value < 0:
                    raise self.fail(f"{p}.caps.{name}", "must not be negative")
            if b.delivery is not None:
                self.delivery(b, f"{p}.delivery")
            if b.ping is not None:
                self.ping(b, campaign, f"{p}.ping")

    def margin(self, m: Margin, p: str) -> None:
        if m.percent is not None and m.fixed is not None:
            raise self.fail(p, "a margin is percent or fixed, not both")
        if m.percent is not None:
            try:
                bp = money.parse_percent(m.percent)
            except MoneyError as exc:
                raise self.fail(f"{p}.percent", str(exc)) from exc
            if not 0 <= bp < 10_000:
                raise self.fail(f"{p}.percent", "0 to below 100")
        if m.fixed is not None and self.money(m.fixed, f"{p}.fixed") < 0:
            raise self.fail(f"{p}.fixed", "must not be negative")

    def ping_post(self, c: Campaign, p: str) -> None:
        pp = c.ping_post
        assert pp is not None
        types = {f.name: f.type for f in c.fields}
        for j, name in enumerate(pp.ping_fields):
            if name not in types:
                raise self.fail(f"{p}.ping_fields[{j}]", f"unknown field {name!r}")
            if types[name] in PERSONAL_TYPES or name.lower() in PERSONAL_NAMES:
                raise self.fail(f"{p}.ping_fields[{j}]", f"{name!r} is personal data: it is "
                                "sent at post only")
        if not 1 <= pp.ping_deadline_ms <= MAX_PING_DEADLINE_MS:
            raise self.fail(f"{p}.ping_deadline_ms", f"1 to {MAX_PING_DEADLINE_MS} ms")
        if not 1 <= pp.ping_ttl_s <= MAX_PING_TTL_S:
            raise self.fail(f"{p}.ping_ttl_s", f"1 to {MAX_PING_TTL_S} s")
        if pp.sell_limit < 1:
            raise self.fail(f"{p}.sell_limit", "at least 1")
        self.margin(pp.margin, f"{p}.margin")
        if self.money(pp.min_bid, f"{p}.min_bid") < 0:
            raise self.fail(f"{p}.min_bid", "must not be negative")

    def ping(self, b: Buyer, campaign: Campaign, p: str) -> None:
        g = b.ping
        assert g is not None
        if campaign.ping_post is None:
            raise self.fail(p, f"campaign {campaign.id!r} has no ping_post section")
        if g.margin is not None:
            self.margin(g.margin, f"{p}.margin")
        if g.url is None:  # a fixed-price bidder: its price, no request
            if g.bid_path or g.bid_regex:
                raise self.fail(p, "bid_path/bid_regex need a url")
            return
        self.webhook_url(g.url, f"{p}.url")
        self.webhook_secret(g.secret, f"{p}.secret")
        if not 1 <= g.timeout_ms <= MAX_TIMEOUT_MS:
            raise self.fail(f"{p}.timeout_ms", f"1 to {MAX_TIMEOUT_MS} ms")
        if (g.bid_path is None) == (g.bid_regex is None):
            raise self.fail(p, "a ping url needs bid_path or bid_regex (one of them)")
        for name, value in g.headers.items():
            if not _HEADER_NAME.match(name):
                raise self.fail(f"{p}.headers", f"{name!r} is not a valid header name")
            if _HEADER_CTL.search(resolve_secret(value)):
                raise self.fail(f"{p}.headers.{name}", "a header value must not contain "
                                "control characters")
        try:
            BidReader(g)
        except DeliveryError as exc:
            raise self.fail(p, str(exc)) from exc

    def webhook_url(self, url: str, p: str) -> None:
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. "Invalid IPv6 URL" for http://[::1
            # the URL is never echoed: its user info or query may hold a secret
            raise self.fail(p, f"not an http(s) URL with a host: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(p, "not an http(s) URL with a host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise self.fail(p, f"invalid port: {exc}") from exc

    def webhook_secret(self, value: str, p: str) -> None:
        if not value:  # every webhook is signed (Standard Webhooks): no secret, no hook
            raise self.fail(p, "required: every webhook request is signed "
                            "(whsec_<base64> or env:NAME)")
        secret = resolve_secret(value)
        if not secret:
            raise self.fail(p, "empty (is its environment variable set?)")
        if not secret.startswith("whsec_"):
            raise self.fail(p, "expected whsec_<base64> or env:NAME")
        try:
            Signer(secret)
        except SigningError as exc:
            raise self.fail(p, str(exc)) from exc

    def tenant_webhook(self, w: TenantWebhook | None, p: str) -> None:
        """The tenant's own webhook (engine.delivery.tenant_hooks), when it has one."""
        if w is None:
            return
        self.webhook_url(w.url, f"{p}.url")
        self.webhook_secret(w.secret, f"{p}.secret")
        for j, etype in enumerate(w.events):
            if not _EVENT_TYPE.fullmatch(etype):
                raise self.fail(f"{p}.events[{j}]", f"{etype!r} is not an event type")
        if not 1 <= w.timeout_ms <= MAX_TIMEOUT_MS:
            raise self.fail(f"{p}.timeout_ms", f"1 to {MAX_TIMEOUT_MS} ms")

    def delivery(self, b: Buyer, p: str) -> None:
        """A buyer's webhook settings, checked here so a bad one fails the load (with its
        path) instead of every delivery in the worker."""
        d = b.delivery
        assert d is not None
        self.webhook_url(d.url, f"{p}.url")
        self.webhook_secret(d.secret, f"{p}.secret")
        for name, value in d.headers.items():
            if not _HEADER_NAME.match(name):  # RFC 9110 token; a space or ':' is sent as is
                raise self.fail(f"{p}.headers", f"{name!r} is not a valid header name "
                                "(letters, digits and !#$%&'*+-.^_`|~)")
            if value.startswith("env:") and not resolve_secret(value):
                raise self.fail(f"{p}.headers.{name}",
                                "empty (is its environment variable set?)")
            if _HEADER_CTL.search(resolve_secret(value)):  # aiohttp refuses it at send time
                # the value is not echoed: it may be a secret
                raise self.fail(f"{p}.headers.{name}", "a header value must not contain "
                                "control characters (CR, LF, NUL, ...; a tab is allowed)")
        for field in ("timeout_ms", "max_attempts", "max_age_s", "retry_base_ms",
                      "retry_max_ms", "breaker_failures", "breaker_cooldown_s"):
            if getattr(d, field) < 1:
                raise self.fail(f"{p}.{field}", "must be positive")
        if d.timeout_ms > MAX_TIMEOUT_MS:  # a request must end well before another worker
            # may claim its job (WorkerOptions.claim_idle_ms, 60 s), or it is sent twice
            raise self.fail(f"{p}.timeout_ms", f"at most {MAX_TIMEOUT_MS} ms")
        if d.breaker_cooldown_s > MAX_COOLDOWN_S:  # the open breaker's key: PX cooldown
            raise self.fail(f"{p}.breaker_cooldown_s", f"at most {MAX_COOLDOWN_S} s (a day)")
        if d.retry_max_ms < d.retry_base_ms:
            raise self.fail(f"{p}.retry_max_ms", "must not be below retry_base_ms")
        if d.max_price is not None and self.money(d.max_price, f"{p}.max_price") < 0:
            raise self.fail(f"{p}.max_price", "must not be negative")
        for kind in ("accept", "duplicate"):
            for j, rule in enumerate(getattr(d, kind)):
                self.rule(rule, f"{p}.{kind}[{j}]")
        try:  # anything else the endpoint cannot be built with (template, rules, price)
            RequestBuilder(b.id, d)
            ResponseMapper(d, buyer_price=money.parse(b.price))
        except DeliveryError as exc:
            raise self.fail(p, str(exc)) from exc

    def rule(self, rule: ResponseRule, p: str) -> None:
        if not (rule.status or rule.path or rule.contains is not None or rule.regex):
            raise self.fail(p, "a response rule needs status, path, contains or regex")
        if rule.equals is not None and not rule.path:
            raise self.fail(f"{p}.equals", "'equals' needs a 'path'")
        for j, status in enumerate(rule.status):
            if not 100 <= status <= 599:
                raise self.fail(f"{p}.status[{j}]", f"{status} is not an HTTP status")
        if rule.regex:
            try:
                re.compile(rule.regex)
            except re.error as exc:
                raise self.fail(f"{p}.regex", f"invalid regex: {exc}") from exc


def check(cfg: Config) -> None:
    c = _Checker(cfg)
    c.tenants()
    c.clients()
    c.campaigns()
    c.suppliers()
    c.buyers()
    for name in ("batch_max", "batch_inflight", "replay_window_s", "idempotency_ttl_s",
                 "max_body_bytes", "max_batch_body_bytes", "max_connections",
                 "max_header_bytes", "max_headers"):
        if getattr(cfg.settings, name) < 1:
            raise c.fail(f"settings.{name}", "at least 1")
    if not 0 <= cfg.settings.port <= MAX_PORT:  # uvloop binds 99999 as 99999 % 65536
        raise c.fail("settings.port", f"0 to {MAX_PORT} (0: any free port)")
    for name, most in MAX_TTL_S.items():
        if getattr(cfg.settings, name) > most:
            raise c.fail(f"settings.{name}", f"1 to {most} seconds")
    for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
        if not 0 < getattr(cfg.settings, name) <= MAX_HTTP_TIMEOUT_S:
            raise c.fail(f"settings.{name}",
                         f"more than 0 and at most {MAX_HTTP_TIMEOUT_S} seconds")
    if cfg.settings.public_url is not None and not valid_public_url(cfg.settings.public_url):
        raise c.fail("settings.public_url",
                     "an http(s) URL without query or fragment (https://leads.acme.example), "
                     f"at most {MAX_PUBLIC_URL} characters")
    if not 1 <= cfg.settings.invite_ttl_hours <= MAX_INVITE_TTL_HOURS:
        raise c.fail("settings.invite_ttl_hours", f"1 to {MAX_INVITE_TTL_HOURS} hours")
    if not 0 <= cfg.settings.api_key_cache_s <= MAX_KEY_CACHE_S:
        raise c.fail("settings.api_key_cache_s", f"0 to {MAX_KEY_CACHE_S} seconds")
    portal_bounds = {"session_hours": 720, "session_idle_minutes": 1440,
                     "login_max_failures": 100, "login_lock_minutes": 1440}
    for name, most in portal_bounds.items():
        if not 1 <= getattr(cfg.settings, name) <= most:
            raise c.fail(f"settings.{name}", f"1 to {most}")
    if not valid_public_url(cfg.settings.stripe_js_url):
        raise c.fail("settings.stripe_js_url", "an http(s) URL without query or fragment")
    if cfg.settings.idempotency_ttl_s < cfg.settings.replay_window_s:
        # a keyed lead's payload record points to its key's record: the pointer must not
        # outlive what it points to
        raise c.fail("settings.idempotency_ttl_s", "at least settings.replay_window_s")
    # compiling the routing plans checks what only compilation can: regexes, ranges,
    # schedules, field rules (each raises ConfigError with its path)
    Runtime(cfg)
