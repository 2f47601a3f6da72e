"""The message kinds, their default templates and rendering in Jinja2's sandbox.

Each kind has three templates: a one-line ``subject``, a plain ``text`` body and an ``html``
body. The defaults ship as package data (``engine/notify/defaults/<kind>.{subject,txt,html}``);
a tenant may later override them (issue #19), so every template is treated as untrusted:

- it renders in :class:`jinja2.sandbox.SandboxedEnvironment` (no ``''.__class__`` and the
  like: a :class:`jinja2.exceptions.SecurityError`), with :class:`jinja2.StrictUndefined`
  (a misspelt variable is an error, not an empty string);
- HTML is autoescaped (a client named ``<script>`` arrives as ``&lt;script&gt;``); text and
  subject are not (they are not HTML), and the subject is folded onto one line, so no value
  can add a mail header;
- a template is at most :data:`MAX_TEMPLATE_BYTES` (UTF-8);
- amounts are integer micros, shown with the ``money`` filter (:func:`engine.core.money.format`):
  ``{{ 103_000_000|money }}`` is ``103.00``; a float or a string is refused.

:func:`validate` renders a candidate against the kind's :data:`SAMPLES` and raises
:class:`engine.notify.TemplateError` with the reason; :func:`render` is the one way a message
is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from engine.core import money
from engine.notify import TemplateError

KINDS: Final[tuple[str, ...]] = (
    "balance_alert",
    "balance_negative",
    "account_paused",
    "account_resumed",
    "recharge_succeeded",
    "recharge_declined",
    "recharge_failed",
    "daily_cap_reached",
    "funding_received",
    "refund_processed",
    "cap_reached",
    "webhook_failing",
    "return_requested",
    "return_decided",
    "weekly_report",
)
PARTS: Final[tuple[str, ...]] = ("subject", "text", "html")
_SUFFIX: Final[dict[str, str]] = {"subject": "subject", "text": "txt", "html": "html"}

MAX_TEMPLATE_BYTES: Final = 64 * 1024

_COMMON: Final[dict[str, Any]] = {
    "tenant_name": "Acme Leads",
    "client_name": "Bright Solar LLC",
    "account_id": "c-1042",
    "currency": "USD",
}
# the link of the kinds a recipient may unsubscribe from (engine.notify.prefs.OPTIONAL), in
# their samples; a real message has it only when the engine has a public URL (docs/
# notifications.md), so validate() renders such a kind with it and without it
SAMPLE_UNSUBSCRIBE_URL: Final = "https://leads.example.com/v1/notify/unsubscribe?t=sample"
# what each kind's template may use (and previews show); amounts are integer micros
SAMPLES: Final[dict[str, dict[str, Any]]] = {
    "balance_alert": {"balance": 19_500_000, "threshold": 20_000_000},
    "balance_negative": {"balance": -4_250_000, "floor": -20_000_000},
    "account_paused": {"reason": "the balance is under the minimum", "balance": 3_000_000,
                       "minimum": 50_000_000},
    "account_resumed": {"balance": 150_000_000},
    "recharge_succeeded": {"amount": 100_000_000, "fee": 3_000_000, "balance": 118_000_000,
                           "card_last4": "4242"},
    "recharge_declined": {"amount": 100_000_000, "card_last4": "0002",
                          "reason": "insufficient funds", "balance": 12_000_000},
    "recharge_failed": {"amount": 100_000_000, "reason": "the card processor did not answer",
                        "balance": 12_000_000, "next_attempt": "2026-12-08 09:00 UTC"},
    "daily_cap_reached": {"recharges": 3, "amount_today": 300_000_000, "balance": 8_000_000},
    "funding_received": {"amount": 500_000_000, "method": "bank transfer",
                         "balance": 512_000_000},
    "refund_processed": {"amount": 75_000_000, "balance": 25_000_000},
    "cap_reached": {"buyer_name": "Sunrise Installers", "cap": 50, "window": "day",
                    "unsubscribe_url": SAMPLE_UNSUBSCRIBE_URL},
    # the webhook's host only: its path or query may hold a token
    "webhook_failing": {"buyer_name": "Sunrise Installers", "host": "hooks.example.com",
                        "failures": 10, "last_error": "http 503",
                        "unsubscribe_url": SAMPLE_UNSUBSCRIBE_URL},
    # to the tenant's operators; returns are granted when they are made
    "return_requested": {"lead_id": "l-8f3a", "buyer_name": "Sunrise Installers",
                         "amount": 35_000_000, "reason": "disconnected phone number",
                         "unsubscribe_url": SAMPLE_UNSUBSCRIBE_URL},
    "return_decided": {"lead_id": "l-8f3a", "granted": True, "amount": 35_000_000,
                       "explanation": "The phone number was disconnected.",
                       "unsubscribe_url": SAMPLE_UNSUBSCRIBE_URL},
    "weekly_report": {"week_start": "2026-11-30", "week_end": "2026-12-06", "leads": 412,
                      "spent": 14_420_000_000, "funded": 15_000_000_000, "returns": 3,
                      "returned": 105_000_000, "refunded": 0, "balance": 1_080_000_000,
                      "unsubscribe_url": SAMPLE_UNSUBSCRIBE_URL},
}


@dataclass(frozen=True, slots=True)
class Templates:
    """The three template sources of one kind."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered message: a one-line subject, a text body and an HTML body; and the
    recipient's unsubscribe link when its context had one (the transport adds the
    ``List-Unsubscribe`` headers for it)."""

    subject: str
    text: str
    html: str
    unsubscribe_url: str | None = None


def _money(value: object) -> str:
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError, naming the variable
    # bool is an int too, and a float or a string is not money
    if not isinstance(value, int) or isinstance(value, bool):
        raise TemplateError("?", "?", f"money: {value!r} is not an amount in integer micros")
    return money.format(value)


def _environment(*, autoescape: bool) -> SandboxedEnvironment:
    env = SandboxedEnvironment(autoescape=autoescape, undefined=jinja2.StrictUndefined,
                               auto_reload=False, cache_size=0)
    env.filters["money"] = _money
    return env


_HTML_ENV: Final = _environment(autoescape=True)
_PLAIN_ENV: Final = _environment(autoescape=False)


def sample(kind: str) -> dict[str, Any]:
    """The sample data of ``kind`` (a copy), for previews and :func:`validate`."""
    _check_kind(kind)
    return {**_COMMON, **SAMPLES[kind]}


@cache
def default(kind: str) -> Templates:
    """The default templates of ``kind``, read from the package data."""
    _check_kind(kind)
    folder = resources.files("engine.notify") / "defaults"
    text = {part: (folder / f"{kind}.{_SUFFIX[part]}").read_text(encoding="utf-8")
            for part in PARTS}
    return Templates(**text)


def render(kind: str, context: Mapping[str, Any], templates: Templates | None = None) -> Rendered:
    """Render ``kind`` with ``context`` (its own templates, or the defaults)."""
    _check_kind(kind)
    tpl = templates if templates is not None else default(kind)
    data = dict(context)
    subject = _render(kind, "subject", tpl.subject, data)
    link = data.get("unsubscribe_url")
    return Rendered(
        subject=" ".join(subject.split()),  # one line: no value can add a header
        text=_render(kind, "text", tpl.text, data),
        html=_render(kind, "html", tpl.html, data),
        unsubscribe_url=link if isinstance(link, str) and link else None,
    )


def validate(kind: str, subject: str, text: str, html: str) -> Rendered:
    """Check candidate templates of ``kind`` by rendering them against its sample data.

    Raises :class:`engine.notify.TemplateError` for a template too large, a syntax error, an
    unknown variable, a sandbox violation, or anything else that fails while rendering.
    Returns the rendered sample (the preview). A kind whose sample has an
    ``unsubscribe_url`` is rendered without it too: a message has none when the engine has
    no public URL (``{% if unsubscribe_url is defined %}``).
    """
    candidate = Templates(subject=subject, text=text, html=html)
    data = sample(kind)
    rendered = render(kind, data, candidate)
    if not rendered.subject:
        raise TemplateError(kind, "subject", "renders empty")
    if data.pop("unsubscribe_url", None) is not None:
        try:
            bare = render(kind, data, candidate)
        except TemplateError as exc:
            raise TemplateError(kind, exc.part, f"{exc.reason} (without unsubscribe_url, "
                                "which a message may not have)") from exc
        if not bare.subject:
            raise TemplateError(kind, "subject", "renders empty without unsubscribe_url")
    return rendered


def _check_kind(kind: str) -> None:
    if kind not in SAMPLES:
        raise TemplateError(kind, "-", f"unknown message kind (one of {', '.join(KINDS)})")


def _render(kind: str, part: str, source: str, data: dict[str, Any]) -> str:
    if not isinstance(source, str):
        raise TemplateError(kind, part, "must be a string")
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_TEMPLATE_BYTES:
        raise TemplateError(kind, part, f"{size} bytes, more than {MAX_TEMPLATE_BYTES}")
    env = _HTML_ENV if part == "html" else _PLAIN_ENV
    try:
        return env.from_string(source).render(data)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(kind, part, f"syntax error on line {exc.lineno}: {exc.message}") \
            from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(kind, part, f"not allowed: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(kind, part, f"unknown variable: {exc.message}") from exc
    except TemplateError as exc:
        raise TemplateError(kind, part, exc.reason) from exc
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
            OverflowError, RecursionError) as exc:
        # a template may still fail at run time on the data: {{ 1 / 0 }}, {{ x[9] }}, ...
        raise TemplateError(kind, part, f"{type(exc).__name__}: {exc}") from exc
