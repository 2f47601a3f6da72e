"""The portal's security mechanics: the session cookie, CSRF tokens, the per-address login
throttle, the response headers and the request body bound (docs/portal.md "Security").

- **Session cookie** ``lf_session``: the session's random token (engine.identity keeps its
  SHA-256 only), ``HttpOnly``, ``SameSite=Lax``, ``Path=/portal``, ``Secure`` when the
  portal is served over https (``[settings] public_url`` is https, or the request came in
  over https).
- **CSRF**: a synchronizer token per session, derived rather than stored: the HMAC-SHA256
  of a fixed label keyed with the session's token. Only a holder of the cookie's value can
  compute it, it changes with every login and dies with the session, and there is no
  server state to keep or leak (the database holds only the token's SHA-256, from which it
  cannot be derived). Every form that changes something carries it, and it is checked with
  :func:`hmac.compare_digest`. The login form, before any session, uses a random token in a
  short-lived ``SameSite=Strict`` cookie that the form must repeat (double submit). Every
  POST must also come from the portal's own origin when the browser says where it came
  from (``Origin``).
- **Login throttle by address**: in memory, per process (:class:`AddressThrottle`); the
  per-user lock is in SQL (engine.identity).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "lf_session"
LOGIN_COOKIE = "lf_login"  # the login form's double-submit token
COOKIE_PATH = "/portal"
_CSRF_LABEL = b"leadflow-portal-csrf-v1"
MAX_FORM_BYTES = 64 * 1024


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_ok(session_token: str, sent: object) -> bool:
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(),
                                                         csrf_token(session_token).encode())


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, sent: object) -> bool:
    return bool(expected) and isinstance(sent, str) and hmac.compare_digest(
        sent.encode(), str(expected).encode())


def same_origin(origin: str | None, scheme: str, host: str | None) -> bool:
    """A POST's ``Origin`` (when the browser sends one) is the portal's own."""
    if origin is None or origin == "null":
        # not sent (an old browser), or hidden (a page with Referrer-Policy: no-referrer
        # posts with "Origin: null"): the CSRF token and SameSite decide alone
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme == scheme and parts.netloc == host


class AddressThrottle:
    """Failed logins per client address in a sliding window, in this process's memory: past
    ``max_failures`` in ``window_ms`` the address is refused (429) until its oldest failure
    leaves the window. Bounded: at most ``max_addresses`` addresses are tracked (the oldest
    is forgotten first)."""

    def __init__(self, clock: Callable[[], int], *, max_failures: int = 20,
                 window_ms: int = 15 * 60_000, max_addresses: int = 100_000) -> None:
        self.clock, self.max_failures, self.window_ms = clock, max_failures, window_ms
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[int]] = {}

    def _recent(self, address: str) -> deque[int]:
        seen = self._failures.get(address)
        if seen is None:
            return deque()
        horizon = self.clock() - self.window_ms
        while seen and seen[0] <= horizon:
            seen.popleft()
        if not seen:
            del self._failures[address]
        return seen

    def retry_after_s(self, address: str) -> int:
        """0: the address may try; else seconds until it may."""
        seen = self._recent(address)
        if len(seen) < self.max_failures:
            return 0
        return max(1, (seen[0] + self.window_ms - self.clock() + 999) // 1000)

    def failed(self, address: str) -> None:
        seen = self._recent(address)
        if not seen:
            if len(self._failures) >= self.max_addresses:
                self._failures.pop(next(iter(self._failures)))
            self._failures[address] = seen
        seen.append(self.clock())


def content_security_policy(stripe_origins: tuple[str, ...] = ()) -> str:
    """No inline script or style anywhere; the card page also allows Stripe.js's origin."""
    extra = " ".join(stripe_origins)
    script = f"'self' {extra}".strip()
    return (f"default-src 'none'; script-src {script}; style-src 'self'; "
            f"img-src 'self' data:; connect-src {script}; "
            f"frame-src {extra or chr(39) + 'none' + chr(39)}; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")


CSP_STATE = "portal_csp"  # request.state: a page's own CSP (the card page's)
NO_REFERRER = "portal_no_referrer"  # request.state: a page that sends no Referer at all


class SecureHeaders:
    """Security headers on every portal answer, and the request body bound (413 past
    :data:`MAX_FORM_BYTES`, before a form parser reads it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit()
                                              or int(value) > MAX_FORM_BYTES):
                await _too_large(send)
                return
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_FORM_BYTES:
                return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                state = scope.get("state", {})
                headers.setdefault("content-security-policy",
                                   state.get(CSP_STATE) or content_security_policy())
                headers["x-content-type-options"] = "nosniff"
                headers["x-frame-options"] = "DENY"
                # no portal URL (an account id) leaves the portal; the card page and the
                # invite page (its URL holds the invite's secret) send none at all
                headers["referrer-policy"] = "no-referrer" if state.get(NO_REFERRER) \
                    else "same-origin"
                headers["cross-origin-opener-policy"] = "same-origin"
                headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, bounded, sending)


async def _too_large(send: Send) -> None:
    body = b"request body too large"
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"content-security-policy", content_security_policy().encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})
