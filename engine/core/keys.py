"""Every Redis key name leadflow uses, built here and nowhere else.

All keys of one tenant share the hash tag ``{tenant}``, so that every Lua script, which
only ever touches one tenant, stays in a single Redis Cluster slot. Scripts receive the
tenant prefix as ``KEYS[1]`` and derive per-account and per-buyer keys from it with the
Lua helpers that :func:`lua_preamble` generates from the same table below, so the layout
is written exactly once.
"""

from __future__ import annotations

from engine.core.constants import DEFAULT_FLOOR

ROOT = "lf"

# suffix templates under the tenant prefix; "{}" is the id of the account/buyer/...
_SUFFIX: dict[str, str] = {
    "acct": "acct:{}",  # HASH: bal, floor, alert, rthr, minb, mode, ar, paused, closed
    "buyer": "buyer:{}",  # HASH: paused + cap counters (window id / count pairs)
    "idem": "idem:{}",  # STRING: first decision of a lead, by idempotency key
    "dup": "dup:{}",  # STRING: last sale of a dedupe fingerprint (TTL = look-back)
    "op": "op:{}",  # STRING: applied balance operation (idempotency of credits/usage)
    "lead": "lead:{}",  # HASH: sold lead record (buyers, prices), for refunds
    # billing (see docs/billing.md)
    "pay": "acct:{}:pay",  # HASH: customer (Stripe id), methods (JSON list, [0] = primary)
    "autorecharge": "acct:{}:autorecharge",  # STRING: JSON AutoRecharge set through the API
    "rlock": "acct:{}:rlock",  # STRING: recharge/refund lock of an account (owner, PX TTL)
    "rstate": "acct:{}:rstate",  # HASH: day, n, amount (daily caps), last_ms, attempt
    "attempt": "attempt:{}",  # STRING: JSON charge attempt (funding/recharge state machine)
    "card_tries": "card:{}:tries",  # ZSET: charge attempts on one payment method, by ms
    # LIST: delivery log of a lead to a buyer ("{}:{}": lead, buyer), one JSON entry per
    # attempt or decision, while the delivery is open (TTL)
    "dlog": "dlog:{}:{}",
    "dstate": "dstate:{}",  # HASH: buyer -> delivery outcome of a lead, or a sync claim (TTL)
    "breaker": "breaker:{}",  # STRING: present while the buyer's breaker is open (TTL)
    # STRING (TTL): a webhook_failing event was emitted for the buyer (one per outage)
    "breaker_told": "breaker:{}:told",
    # engine.notify's outbox; "{}" is the digest of (event id, recipient, kind)
    "notify": "notify:{}",  # STRING: "sent", or the token of the sender holding the claim (TTL)
    "notify_tries": "notify:{}:tries",  # HASH: attempts, last_error, retry_at_ms (failed sends)
    "weekly": "weekly:{}",  # STRING: the weekly reports of the week starting {} are all sent
    # engine.notify.prefs; "{}" is the digest of a lower-cased address (no address in a key)
    "notify_prefs": "notify_prefs:{}",  # HASH: category -> "1" (on) / "0" (off)
    # ping-post (docs/pingpost.md)
    # HASH: m (the ping's record, JSON), st (open | posted:<lead id> | expired | released),
    # ex (expiry, epoch ms), a (the seller's answer, JSON), h:<buyer> = "<account>|<micros>"
    # while that buyer's hold is open (TTL: the ping's ttl + PING_KEEP_S)
    "ping": "ping:{}",
    # ZSET: the open holds of an account, "<ping>|<buyer>|<micros>" -> expiry ms (the
    # authority on whether a hold is open; the account hash's `held` is their sum)
    "holds": "acct:{}:holds",
}
_FIXED: dict[str, str] = {
    "ledger": "ledger",  # STREAM: every ledger entry of the tenant (archived to SQL)
    "events": "events",  # STREAM: balance_alert, recharge_needed, buyer_paused, ...
    "deliveries": "deliveries",  # STREAM: one delivery job per sold buyer
    "sold": "sold",  # STREAM: sold leads, as the delivery worker read them (lead archive)
    "cursors": "cursors",  # HASH: campaign id -> round-robin counter
    "accounts": "accounts",  # SET: account ids (reconcile walks it; SCAN finds only these sets)
    "charge_audit": "charge_audit",  # STREAM: every charge attempt transition (audit)
    "open_attempts": "attempts:open",  # ZSET: charge attempts not final yet, by last update ms


    "retries": "deliveries:retry",  # ZSET: delivery jobs waiting for a retry, score = due ms
    "breakers": "breakers",  # ZSET: buyer id -> ms its open breaker half-opens
    "pings": "pings",  # ZSET: ping id -> its expiry ms, while it may hold funds (the sweep)
    # engine.notify.overrides and engine.notify.prefs
    "notify_templates": "notify_templates",  # HASH: message kind -> JSON {subject, text, html}
    "notify_secret": "notify_secret",  # STRING: the unsubscribe links' HMAC key (SET NX once)
}


def tenant_prefix(tenant: str) -> str:
    return f"{ROOT}:{{{tenant}}}:"


def acct(tenant: str, account: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["acct"].format(account)


def buyer(tenant: str, buyer_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["buyer"].format(buyer_id)


def idem(tenant: str, key: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["idem"].format(key)


def dup(tenant: str, fingerprint: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["dup"].format(fingerprint)


def op(tenant: str, op_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["op"].format(op_id)


def lead(tenant: str, lead_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["lead"].format(lead_id)


def pay(tenant: str, account: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["pay"].format(account)


def autorecharge(tenant: str, account: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["autorecharge"].format(account)


def rlock(tenant: str, account: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["rlock"].format(account)


def rstate(tenant: str, account: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["rstate"].format(account)


def attempt(tenant: str, attempt_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["attempt"].format(attempt_id)


def card_tries(tenant: str, payment_method: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["card_tries"].format(payment_method)


def charge_audit(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["charge_audit"]


def dlog(tenant: str, lead_id: str, buyer: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["dlog"].format(lead_id, buyer)


def dstate(tenant: str, lead_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["dstate"].format(lead_id)


def breaker(tenant: str, buyer_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["breaker"].format(buyer_id)


def breaker_told(tenant: str, buyer_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["breaker_told"].format(buyer_id)


def notify(tenant: str, entry: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["notify"].format(entry)


def notify_tries(tenant: str, entry: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["notify_tries"].format(entry)


def weekly(tenant: str, week_start: str) -> str:
    """Set once every weekly report of the week starting ``week_start`` (ISO date) is
    sent or given up (engine.notify.weekly)."""
    return tenant_prefix(tenant) + _SUFFIX["weekly"].format(week_start)


def notify_prefs(tenant: str, address_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["notify_prefs"].format(address_id)


def notify_templates(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["notify_templates"]


def notify_secret(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["notify_secret"]


def open_attempts(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["open_attempts"]


def ledger(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["ledger"]


def events(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["events"]


def deliveries(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["deliveries"]


def sold(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["sold"]


def cursors(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["cursors"]


def accounts(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["accounts"]


def ping(tenant: str, ping_id: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["ping"].format(ping_id)


def holds(tenant: str, account: str) -> str:
    return tenant_prefix(tenant) + _SUFFIX["holds"].format(account)


def pings(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["pings"]


def retries(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["retries"]


def breakers(tenant: str) -> str:
    return tenant_prefix(tenant) + _FIXED["breakers"]


_DEAD = ":dead"


def dead_letter(tenant: str, stream: str) -> str:
    """Dead-letter stream of a worker stream (``deliveries``, ``events``, ...)."""
    return tenant_prefix(tenant) + _FIXED[stream] + _DEAD


def lua_preamble() -> str:
    """Lua helpers ``K.<name>(prefix[, id[, id2]])`` generated from the tables above."""
    lines = ["local K = {}", f"local DEFAULT_FLOOR = {DEFAULT_FLOOR}"]
    for name, template in _SUFFIX.items():
        parts = template.split("{}")
        args = ["id", "id2"][:len(parts) - 1]
        body = " .. ".join(["p"] + [x for i, part in enumerate(parts) for x in (
            [repr(part)] if part else []) + ([args[i]] if i < len(args) else [])])
        lines.append(f"K.{name} = function(p, {', '.join(args)}) return {body} end")
    for name, suffix in _FIXED.items():
        lines.append(f"K.{name} = function(p) return p .. {suffix!r} end")
    # the dead-letter stream of a stream key (K.dead(K.deliveries(p))), as dead_letter()
    lines.append(f"K.dead = function(k) return k .. {_DEAD!r} end")
    return "\n".join(lines).replace("'", '"') + "\n"
