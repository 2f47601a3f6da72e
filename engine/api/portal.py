"""The tenant API of the portal's identities: portal users (with their invite links and
client accounts) and their buyer API keys; and the one unauthenticated call, accepting an
invite (its token is the credential). docs/portal.md.

Every call answers the identity store's refusals (engine.identity.errors) in the API's
error shape; a user or key of another tenant is unknown (404); a client account that is
not the tenant's (or the ``wallet``) is 400 ``unknown_account``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import msgspec

from engine.api import toolkit
from engine.api.auth import Guard
from engine.api.billing import decode_body
from engine.api.endpoints import BY_KEY
from engine.api.schemas import (
    AcceptInviteBody,
    ApiKeyView,
    CreatedKey,
    CreatedUser,
    CreateKeyBody,
    CreateUserBody,
    DeletedUser,
    Invitation,
    KeyList,
    PortalUser,
    UpdateUserBody,
    UserList,
)
from engine.api.toolkit import Request, Response
from engine.core.billing_errors import BillingError
from engine.identity.errors import IdentityError
from engine.identity.store import ApiKey, IdentityStore, Invite, User
from engine.routing.runtime import Runtime

INVITE_PATH = "/portal/invite/"  # the portal's page that takes the token (a later slice)
HOUR_MS = 3_600_000

_create_user = msgspec.json.Decoder(CreateUserBody)
_update_user = msgspec.json.Decoder(UpdateUserBody)
_accept = msgspec.json.Decoder(AcceptInviteBody)
_create_key = msgspec.json.Decoder(CreateKeyBody)

Handler = Callable[[Request, str], Awaitable[Response]]


def user_view(u: User) -> PortalUser:
    return PortalUser(id=u.id, email=u.email, status=u.status, accounts=list(u.accounts),
                      created_ms=u.created_ms, updated_ms=u.updated_ms, role=u.role)


def key_view(k: ApiKey) -> ApiKeyView:
    return ApiKeyView(id=k.id, user_id=k.user_id, name=k.name, prefix=k.prefix,
                      created_by=k.created_by or "tenant", created_ms=k.created_ms,
                      last_used_ms=k.last_used_ms, revoked_ms=k.revoked_ms)


def invitation(invite: Invite) -> Invitation:
    return Invitation(invite_url=INVITE_PATH + invite.token, invite_token=invite.token,
                      expires_ms=invite.expires_ms)


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _refusal(status: int, code: str, message: str) -> _Refused:
    return _Refused(toolkit.error_response(status, code, message))


class PortalApi:
    def __init__(self, runtime: Callable[[], Runtime], identity: Callable[[], IdentityStore | None],
                 guard: Guard, *, invite_ttl_hours: int = 72) -> None:
        self.runtime, self.identity, self.guard = runtime, identity, guard
        self.invite_ttl_ms = invite_ttl_hours * HOUR_MS

    def mount(self, router: toolkit.Router) -> None:
        def add(method: str, path: str, handler: Handler) -> None:
            router.add(method, path, self.guard.route(BY_KEY[(method, path)], _answer(handler)))

        add("POST", "/v1/portal/users", self.create_user)
        add("GET", "/v1/portal/users", self.list_users)
        add("GET", "/v1/portal/users/{id}", self.get_user)
        add("PATCH", "/v1/portal/users/{id}", self.update_user)
        add("DELETE", "/v1/portal/users/{id}", self.delete_user)
        add("POST", "/v1/portal/users/{id}/invite", self.invite)
        add("POST", "/v1/portal/users/{id}/keys", self.create_key)
        add("GET", "/v1/portal/users/{id}/keys", self.list_keys)
        add("DELETE", "/v1/portal/keys/{key_id}", self.revoke_key)

        async def accept(req: Request) -> Response:
            return await _answer(self.accept_invite)(req, "")

        router.add("POST", "/v1/portal/invites/{token}", accept)

    def _ids(self) -> IdentityStore:
        ids = self.identity()
        if ids is None:
            raise _refusal(503, "unavailable", "the identity store is not available: retry "
                                               "later")
        return ids

    def _accounts(self, tenant: str, accounts: Sequence[str]) -> list[str]:
        """Client accounts of this tenant (never the wallet, never another tenant's)."""
        clients = self.runtime().clients
        for a in accounts:
            if (tenant, a) not in clients:
                raise _refusal(400, "unknown_account", f"no client account {a!r} of this "
                                                       "tenant")
        return list(accounts)

    async def create_user(self, req: Request, tenant: str) -> Response:
        ids = self._ids()
        body: CreateUserBody = decode_body(req, _create_user)
        accounts = self._accounts(tenant, body.accounts)
        user, invite = await ids.create_user(tenant, body.email, accounts,
                                             invite_ttl_ms=self.invite_ttl_ms, role=body.role)
        return toolkit.json_response(CreatedUser(user_view(user), invitation(invite)), 201)

    async def list_users(self, req: Request, tenant: str) -> Response:
        users = await self._ids().users(tenant)
        return toolkit.json_response(UserList([user_view(u) for u in users]))

    async def get_user(self, req: Request, tenant: str) -> Response:
        return toolkit.json_response(user_view(await self._ids().user(tenant, req.params["id"])))

    async def update_user(self, req: Request, tenant: str) -> Response:
        ids = self._ids()
        body: UpdateUserBody = decode_body(req, _update_user)
        accounts = None if isinstance(body.accounts, msgspec.UnsetType) else self._accounts(
            tenant, body.accounts)
        status = None if isinstance(body.status, msgspec.UnsetType) else body.status
        user = await ids.update_user(tenant, req.params["id"], status=status, accounts=accounts)
        return toolkit.json_response(user_view(user))

    async def delete_user(self, req: Request, tenant: str) -> Response:
        user_id = req.params["id"]
        revoked = await self._ids().delete_user(tenant, user_id)
        return toolkit.json_response(DeletedUser(user_id, True, revoked))

    async def invite(self, req: Request, tenant: str) -> Response:
        invite = await self._ids().reinvite(tenant, req.params["id"],
                                            invite_ttl_ms=self.invite_ttl_ms)
        return toolkit.json_response(invitation(invite), 201)

    async def accept_invite(self, req: Request, _: str) -> Response:
        ids = self._ids()
        body: AcceptInviteBody = decode_body(req, _accept)
        user = await ids.accept_invite(req.params["token"], body.password)
        return toolkit.json_response(user_view(user))

    async def create_key(self, req: Request, tenant: str) -> Response:
        ids = self._ids()
        body = CreateKeyBody() if not req.body else decode_body(req, _create_key)
        key, secret = await ids.create_key(tenant, req.params["id"], body.name)
        return toolkit.json_response(CreatedKey(secret, key_view(key)), 201)

    async def list_keys(self, req: Request, tenant: str) -> Response:
        keys = await self._ids().keys(tenant, req.params["id"])
        return toolkit.json_response(KeyList([key_view(k) for k in keys]))

    async def revoke_key(self, req: Request, tenant: str) -> Response:
        key = await self._ids().revoke_key(tenant, req.params["key_id"])
        return toolkit.json_response(key_view(key))


def _answer(handler: Handler) -> Handler:
    """The handler's refusals (a body it cannot decode, the identity store's errors) as the
    API's error answers."""

    async def wrapped(req: Request, tenant: str) -> Response:
        try:
            return await handler(req, tenant)
        except _Refused as exc:
            return exc.response
        except (IdentityError, BillingError) as exc:
            return toolkit.error_response(exc.status, exc.code, str(exc))

    wrapped.__name__ = getattr(handler, "__name__", "portal")
    return wrapped

