"""Who is calling a tenant endpoint: the tenant (its ``api_token``) or a buyer (an API key,
``lfk_...``), and what the caller may reach (docs/portal.md "Access").

Every tenant endpoint is mounted through :meth:`Guard.route` with its entry of the route
table (engine.api.endpoints), whose ``buyer`` field says what a buyer key may reach:

- ``None``: the tenant's only. A valid buyer key gets 403 ``forbidden_for_buyer_key``.
- ``"account"``: the client account of the path's ``{id}`` must be mapped to the key's user,
  ``"buyer"``: the client account of the path's buyer. Any other (another client, the
  ``wallet``, another tenant's, one that does not exist) is the 404 of an unknown account
  or buyer, decided here, before the handler runs: nothing is read or moved.
- ``"sale"``: the handler checks the buyer named in the body (``scope_accounts``).

A key that is malformed, unknown, revoked, or of a disabled or deleted user is a 401, as a
wrong tenant token is. With a key, the handler sees ``leadflow.user`` = ``<user>/key:<id>``
(the ``user`` of the ledger entries it makes) and every change it makes that succeeds is
written to the audit trail (who, which key, what, which account).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from engine.api import toolkit
from engine.api.endpoints import Endpoint
from engine.api.toolkit import Request, Response
from engine.core.constants import WALLET
from engine.identity import credentials
from engine.identity.store import Actor, IdentityStore, Principal
from engine.routing.runtime import Runtime, token_digest

log = logging.getLogger("leadflow.api")

TenantHandler = Callable[[Request, str], Awaitable[Response]]
PRINCIPAL = "leadflow.principal"  # scope: the buyer key's Principal (absent: the tenant)
# scope: a Principal an in-process caller acts as (engine.api.app.App.call_as: the portal's
# session). Only a scope built in this process holds one: a request's scope is uvicorn's,
# which never has this key, and a Principal is no value an HTTP request can carry
ACT_AS = "leadflow.act_as"
ACCOUNT = "leadflow.account"  # scope: the client account a buyer key's action was for


def bearer(req: Request) -> str | None:
    header = req.header(b"authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(runtime: Runtime, req: Request) -> str | None:
    """The tenant of the request's bearer token (a tenant token, never a buyer key), or None."""
    token = bearer(req)
    if token is None or credentials.looks_like_key(token):
        return None
    return runtime.tokens.get(token_digest(token))


def principal(req: Request) -> Principal | None:
    """The buyer key's principal of a request, None when the tenant calls."""
    p = req.scope.get(PRINCIPAL)
    return p if isinstance(p, Principal) else None


def scope_accounts(req: Request) -> frozenset[str] | None:
    """The client accounts the caller may reach: a buyer key's mapped ones; None: any of
    the tenant's (the tenant's own token)."""
    p = principal(req)
    return None if p is None else p.accounts


def reaches_account(rt: Runtime, p: Principal, account: str) -> bool:
    """A buyer (key or portal session) reaches a client account of its tenant mapped to its
    user; never the wallet, another tenant's or one the config no longer has."""
    return account != WALLET and account in p.accounts and (p.tenant, account) in rt.clients


def _unauthorized() -> Response:
    return toolkit.error_response(401, "unauthorized", "missing or invalid bearer token")


class Guard:
    def __init__(self, runtime: Callable[[], Runtime],
                 identity: Callable[[], IdentityStore | None]) -> None:
        self.runtime, self.identity = runtime, identity

    def route(self, endpoint: Endpoint, handler: TenantHandler) -> toolkit.Handler:
        async def guarded(req: Request) -> Response:
            acting = req.scope.get(ACT_AS)
            if isinstance(acting, Principal):  # the portal, for its session's user
                ids = self.identity()
                if ids is None:
                    return toolkit.error_response(503, "unavailable",
                                                  "logins cannot be checked now: retry later")
                return await self._as_principal(endpoint, handler, req, acting, ids)
            token = bearer(req)
            if token is None:
                return _unauthorized()
            if credentials.looks_like_key(token):
                return await self._as_buyer(endpoint, handler, req, token)
            tenant = self.runtime().tokens.get(token_digest(token))
            if tenant is None:
                return _unauthorized()
            req.scope["leadflow.tenant"] = tenant
            return await handler(req, tenant)

        guarded.__name__ = getattr(handler, "__name__", "guarded")
        return guarded

    async def _as_buyer(self, endpoint: Endpoint, handler: TenantHandler, req: Request,
                        token: str) -> Response:
        ids = self.identity()
        if ids is None:
            return toolkit.error_response(503, "unavailable",
                                          "buyer keys cannot be checked now: retry later")
        p = await ids.principal(token)
        if p is None:
            return _unauthorized()
        return await self._as_principal(endpoint, handler, req, p, ids)

    async def _as_principal(self, endpoint: Endpoint, handler: TenantHandler, req: Request,
                            p: Principal, ids: IdentityStore) -> Response:
        """The endpoint for a buyer: a key's, or a portal session's (the same checks, the
        same audit rows)."""
        rt = self.runtime()
        if p.tenant not in rt.tenants:
            return _unauthorized()
        if endpoint.buyer is None:
            return toolkit.error_response(403, "forbidden_for_buyer_key",
                                          "a buyer API key cannot use this endpoint")
        if endpoint.buyer == "account":
            account = req.params["id"]
            if not reaches_account(rt, p, account):
                return toolkit.error_response(404, "unknown_account", "no such account")
            req.scope[ACCOUNT] = account
        elif endpoint.buyer == "buyer":
            client = rt.buyer_client.get((p.tenant, req.params["id"]))
            if client is None or client not in p.accounts:
                return toolkit.error_response(404, "unknown_buyer", "no such buyer")
            req.scope[ACCOUNT] = client
        req.scope["leadflow.tenant"] = p.tenant
        req.scope["leadflow.user"] = p.label
        req.scope[PRINCIPAL] = p
        resp = await handler(req, p.tenant)
        if endpoint.method != "GET" and resp.status < 400:
            await self._audit(ids, p, endpoint, req, resp)
        return resp

    @staticmethod
    async def _audit(ids: IdentityStore, p: Principal, endpoint: Endpoint, req: Request,
                     resp: Response) -> None:
        """The change a buyer key made, in the audit trail. It happened: a failure to write
        the row is logged, the answer stands (the ledger entries name the user too)."""
        account = req.scope.get(ACCOUNT)
        detail: dict[str, object] = {"method": endpoint.method, "path": req.path,
                                     "status": resp.status, "params": dict(req.params)}
        if not p.key_id:
            detail["via"] = "portal"
        idem = req.header(b"idempotency-key")
        if idem:
            detail["idempotency_key"] = idem[:255]
        try:
            await ids.audit(p.tenant, Actor(p.user_id, p.key_id), endpoint.operation_id,
                            account if isinstance(account, str) else "", detail)
        except Exception:
            log.exception("audit row not written", extra={"action": endpoint.operation_id})
