"""The identity store: portal users, their client accounts, invites, buyer API keys and the
audit trail, in SQL (SQLite by default, PostgreSQL with ``sql_url``; engine.store.sql).

Every change is one SQL transaction together with its audit row, and a refused change
(:mod:`engine.identity.errors`) keeps nothing. A tenant only ever reaches its own users and
keys: every statement names the tenant, so another tenant's user or key is unknown.

Buyer keys are resolved by :meth:`IdentityStore.principal`: the key's id and an index read,
then its SHA-256 compared in constant time; the answer is kept ``key_cache_s`` seconds in
this process (docs/portal.md "Revocation"), and every change made through this store
forgets what it kept, so in this process a revocation takes effect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec

from engine.core.email import normalize_email
from engine.identity import credentials
from engine.identity.credentials import Passwords
from engine.identity.errors import (
    EmailTaken,
    InvalidInput,
    InviteInvalid,
    OperatorUser,
    TooManyKeys,
    UnknownKey,
    UnknownUser,
    UserDisabled,
)
from engine.store.sql import Backend, NoRows, Step, open_backend

Status = Literal["invited", "active", "disabled"]
# buyer: the portal's account pages for its mapped client accounts, buyer keys; operator:
# the operator page of its tenant (read-only), no client account, no key
Role = Literal["buyer", "operator"]
MAX_ACTIVE_KEYS = 20  # unrevoked keys per user
MAX_ACCOUNTS = 100  # client accounts per user
MAX_NAME = 100  # a key's name
LAST_USED_EVERY_MS = 60_000  # last_used_ms is written at most once a minute per key
SESSION_TOUCH_MS = 60_000  # a session's last_seen_ms is written at most once a minute
_json = msgspec.json.Encoder()


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class User(msgspec.Struct, frozen=True):
    id: str
    tenant: str
    email: str
    status: Status
    accounts: list[str]
    created_ms: int
    updated_ms: int
    has_password: bool
    role: Role = "buyer"


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    tenant: str
    user_id: str
    name: str
    prefix: str
    created_by: str  # "" the tenant, else the portal user's id
    created_ms: int
    last_used_ms: int | None
    revoked_ms: int | None


class LoginThrottle(NamedTuple):
    """A user is locked ``lock_ms`` after ``max_failures`` wrong passwords in a row."""

    max_failures: int = 5
    lock_ms: int = 15 * 60_000


class Invite(NamedTuple):
    token: str  # shown once: the link's secret
    expires_ms: int


class Principal(msgspec.Struct, frozen=True):
    """Who a buyer key speaks for: its tenant, user and the client accounts mapped to it."""

    tenant: str
    user_id: str
    key_id: str
    accounts: frozenset[str]
    operator: bool = False  # a portal session of an operator (no accounts, no key)

    @property
    def label(self) -> str:
        """The ``user`` of ledger entries it makes: ``<user>/key:<key id>`` for a buyer
        key, ``<user>/portal`` for a portal session (no key)."""
        return f"{self.user_id}/key:{self.key_id}" if self.key_id else f"{self.user_id}/portal"


class Actor(NamedTuple):
    """Who makes a change: the tenant (its token), or a portal user through one of its keys."""

    user: str = ""  # "": the tenant
    key: str = ""

    @property
    def name(self) -> str:
        return self.user or "tenant"


TENANT = Actor()
_USER_COLS = ("id, tenant, email, status, created_ms, updated_ms, password_hash IS NOT NULL, "
              "EXISTS (SELECT 1 FROM portal_operators o WHERE o.user_id = portal_users.id "
              "AND o.tenant = portal_users.tenant)")
_KEY_COLS = ("id, tenant, user_id, name, prefix, created_by, created_ms, last_used_ms, "
             "revoked_ms")


class IdentityStore:
    def __init__(self, backend: Backend, *, clock: Callable[[], int] = wall_ms,
                 passwords: Passwords | None = None, key_cache_s: float = 0.0) -> None:
        self._db = backend
        self.clock = clock  # epoch ms: tests move it to expire invites
        self.passwords = passwords or Passwords()
        self.key_cache_s = key_cache_s
        self._cache: dict[str, tuple[float, Principal]] = {}
        # bumped by every change: a lookup that began before a change caches nothing
        self._generation = 0
        self._hashing = asyncio.Semaphore(2)  # argon2 takes 64 MiB and a core per hash
        self._dummy: str | None = None  # a throwaway hash: see _verify

    @classmethod
    async def open(cls, url: str | None = None, *, path: str | Path,
                   **kw: Any) -> IdentityStore:
        """On ``url`` (``postgresql://...``, ``sqlite:///file``), else the SQLite file
        ``path``; its tables are created if missing."""
        backend = await open_backend(url, path)
        try:
            schema = resources.files("engine.identity").joinpath("schema.sql").read_text(
                encoding="utf-8")
            await backend.script(schema)
        except BaseException:
            await backend.close()
            raise
        return cls(backend, **kw)

    async def close(self) -> None:
        await self._db.close()

    # -- SQL --------------------------------------------------------------------------------

    def _q(self, sql: str) -> str:
        """``?`` placeholders in the backend's style (no statement here has a literal ?)."""
        return sql if self._db.ph == "?" else sql.replace("?", self._db.ph)

    def _step(self, sql: str, params: Sequence[Any] = (), need: bool = False) -> Step:
        return Step(self._q(sql), params, need)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._db.fetch(self._q(sql), params)

    async def _batch(self, steps: Sequence[Step]) -> list[int]:
        counts = await self._db.batch(steps)
        self._generation += 1
        self._cache.clear()  # whatever changed, a key resolves afresh
        return counts

    def _audit(self, tenant: str, actor: Actor, action: str, account: str = "",
               detail: dict[str, Any] | None = None) -> Step:
        now = self.clock()
        return self._step(
            "INSERT INTO portal_audit (id, tenant, actor, key_id, action, account, detail, "
            "ts_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (f"{now:013d}-{secrets.token_hex(6)}", tenant, actor.name, actor.key, action,
             account, _json.encode(detail or {}).decode(), now))

    async def audit(self, tenant: str, actor: Actor, action: str, account: str = "",
                    detail: dict[str, Any] | None = None) -> None:
        """One audit row: an action made through the API (a buyer key's funding, ...)."""
        await self._db.batch([self._audit(tenant, actor, action, account, detail)])

    async def audit_rows(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's newest audit rows first."""
        rows = await self._fetch(
            "SELECT id, actor, key_id, action, account, detail, ts_ms FROM portal_audit "
            "WHERE tenant = ? ORDER BY ts_ms DESC, id DESC LIMIT ?", (tenant, limit))
        return [{"id": r[0], "actor": r[1], "key_id": r[2], "action": r[3], "account": r[4],
                 "detail": msgspec.json.decode(r[5]), "ts_ms": int(r[6])} for r in rows]

    # -- users ------------------------------------------------------------------------------

    async def create_user(self, tenant: str, email: str, accounts: Iterable[str], *,
                          invite_ttl_ms: int, actor: Actor = TENANT,
                          role: Role = "buyer") -> tuple[User, Invite]:
        """A new user (``invited``: no password yet) mapped to ``accounts`` (client accounts
        of the tenant: the caller checks them), with its invite. EmailTaken: the tenant
        has a user with that address; OperatorUser: an operator with accounts."""
        address = _email(email)
        mapped = _accounts(accounts)
        if role == "operator" and mapped:
            raise OperatorUser("an operator is mapped to no client account")
        now = self.clock()
        user_id = f"usr_{secrets.token_hex(8)}"
        token = credentials.new_invite_token()
        steps = [
            self._step("INSERT INTO portal_users (id, tenant, email, password_hash, status, "
                       "created_ms, updated_ms) VALUES (?, ?, ?, NULL, 'invited', ?, ?) "
                       "ON CONFLICT (tenant, email) DO NOTHING",
                       (user_id, tenant, address, now, now), need=True),
            *self._map(tenant, user_id, mapped),
            *([self._step("INSERT INTO portal_operators (tenant, user_id) VALUES (?, ?)",
                          (tenant, user_id))] if role == "operator" else []),
            self._invite(tenant, user_id, token, now + invite_ttl_ms),
            self._audit(tenant, actor, "user.create", detail={
                "user": user_id, "email": address, "accounts": mapped, "role": role}),
        ]
        try:
            await self._batch(steps)
        except NoRows:
            raise EmailTaken(f"a user with e-mail {address} exists") from None
        user = User(user_id, tenant, address, "invited", mapped, now, now, False, role)
        return user, Invite(token, now + invite_ttl_ms)

    def _map(self, tenant: str, user_id: str, accounts: list[str]) -> list[Step]:
        return [self._step("INSERT INTO portal_user_accounts (tenant, user_id, account) "
                           "VALUES (?, ?, ?)", (tenant, user_id, a)) for a in accounts]

    def _invite(self, tenant: str, user_id: str, token: str, expires_ms: int) -> Step:
        return self._step("INSERT INTO portal_invites (token_hash, tenant, user_id, "
                          "created_ms, expires_ms) VALUES (?, ?, ?, ?, ?)",
                          (credentials.digest(token), tenant, user_id, self.clock(),
                           expires_ms))

    async def users(self, tenant: str) -> list[User]:
        rows = await self._fetch(f"SELECT {_USER_COLS} FROM portal_users WHERE tenant = ? "  # noqa: S608
                                 "ORDER BY created_ms, id", (tenant,))
        maps = await self._fetch("SELECT user_id, account FROM portal_user_accounts "
                                 "WHERE tenant = ? ORDER BY account", (tenant,))
        by_user: dict[str, list[str]] = {}
        for user_id, account in maps:
            by_user.setdefault(user_id, []).append(account)
        return [_user(r, by_user.get(r[0], [])) for r in rows]

    async def user(self, tenant: str, user_id: str) -> User:
        rows = await self._fetch(f"SELECT {_USER_COLS} FROM portal_users "  # noqa: S608
                                 "WHERE tenant = ? AND id = ?", (tenant, user_id))
        if not rows:
            raise UnknownUser("no such user")
        maps = await self._fetch("SELECT account FROM portal_user_accounts WHERE tenant = ? "
                                 "AND user_id = ? ORDER BY account", (tenant, user_id))
        return _user(rows[0], [a for (a,) in maps])

    async def notify_addresses(self, tenant: str, account: str) -> list[str]:
        """The e-mail addresses of the active users mapped to a client account, oldest user
        first: recipients of the account's notifications (engine.notify). An invited user
        (no password yet), a disabled or a deleted one gets nothing."""
        rows = await self._fetch(
            "SELECT u.email FROM portal_users u JOIN portal_user_accounts m ON m.user_id = u.id "
            "AND m.tenant = u.tenant WHERE u.tenant = ? AND m.account = ? AND "
            "u.status = 'active' ORDER BY u.created_ms, u.id", (tenant, account))
        return [str(r[0]) for r in rows]

    async def update_user(self, tenant: str, user_id: str, *, status: Status | None = None,
                          accounts: Iterable[str] | None = None,
                          actor: Actor = TENANT) -> User:
        """``status`` ``disabled`` (its keys stop working, its unused invites are void) or
        ``active`` (back to ``invited`` when it never set a password); ``accounts``
        replaces its mappings."""
        mapped = None if accounts is None else _accounts(accounts)
        if mapped and (await self.user(tenant, user_id)).role == "operator":  # UnknownUser
            raise OperatorUser("an operator is mapped to no client account")
        now = self.clock()
        steps = [self._step("UPDATE portal_users SET updated_ms = ? WHERE tenant = ? AND "
                            "id = ?", (now, tenant, user_id), need=True)]
        if status is not None:
            steps.append(self._step(
                "UPDATE portal_users SET status = CASE WHEN ? = 'disabled' THEN 'disabled' "
                "WHEN password_hash IS NULL THEN 'invited' ELSE 'active' END "
                "WHERE tenant = ? AND id = ?", (status, tenant, user_id)))
            if status == "disabled":
                steps.append(self._step("UPDATE portal_invites SET used_ms = ? WHERE "
                                        "user_id = ? AND used_ms IS NULL", (now, user_id)))
                steps.append(self._end_sessions(tenant, user_id))
        if mapped is not None:
            steps.append(self._step("DELETE FROM portal_user_accounts WHERE tenant = ? AND "
                                    "user_id = ?", (tenant, user_id)))
            steps += self._map(tenant, user_id, mapped)
        detail: dict[str, Any] = {"user": user_id}
        if status is not None:
            detail["status"] = status
        if mapped is not None:
            detail["accounts"] = mapped
        steps.append(self._audit(tenant, actor, "user.update", detail=detail))
        try:
            await self._batch(steps)
        except NoRows:
            raise UnknownUser("no such user") from None
        return await self.user(tenant, user_id)

    async def delete_user(self, tenant: str, user_id: str, *, actor: Actor = TENANT) -> int:
        """The user, its mappings and invites gone, its keys revoked (kept, for the audit
        trail); how many keys were revoked."""
        now = self.clock()
        try:
            counts = await self._batch([
                self._step("DELETE FROM portal_users WHERE tenant = ? AND id = ?",
                           (tenant, user_id), need=True),
                self._step("DELETE FROM portal_user_accounts WHERE tenant = ? AND user_id = ?",
                           (tenant, user_id)),
                self._step("DELETE FROM portal_operators WHERE tenant = ? AND user_id = ?",
                           (tenant, user_id)),
                self._step("DELETE FROM portal_invites WHERE tenant = ? AND user_id = ?",
                           (tenant, user_id)),
                self._end_sessions(tenant, user_id),
                self._step("UPDATE api_keys SET revoked_ms = ? WHERE tenant = ? AND "
                           "user_id = ? AND revoked_ms IS NULL", (now, tenant, user_id)),
                self._audit(tenant, actor, "user.delete", detail={"user": user_id}),
            ])
        except NoRows:
            raise UnknownUser("no such user") from None
        return counts[5]

    async def reinvite(self, tenant: str, user_id: str, *, invite_ttl_ms: int,
                       actor: Actor = TENANT) -> Invite:
        """A new invite (its older unused ones void): a first password for a user who lost
        its link, or a new one for a user who forgot it. UserDisabled for a disabled user."""
        user = await self.user(tenant, user_id)
        if user.status == "disabled":
            raise UserDisabled("the user is disabled: enable it first")
        now = self.clock()
        token = credentials.new_invite_token()
        try:
            await self._batch([
                self._step("UPDATE portal_users SET updated_ms = ? WHERE tenant = ? AND id = ? "
                           "AND status <> 'disabled'", (now, tenant, user_id), need=True),
                self._step("UPDATE portal_invites SET used_ms = ? WHERE user_id = ? AND "
                           "used_ms IS NULL", (now, user_id)),
                self._invite(tenant, user_id, token, now + invite_ttl_ms),
                self._audit(tenant, actor, "user.invite", detail={"user": user_id}),
            ])
        except NoRows:  # deleted or disabled meanwhile
            raise UserDisabled("the user is disabled or gone") from None
        return Invite(token, now + invite_ttl_ms)

    async def accept_invite(self, token: str, password: str) -> User:
        """The invite's user gets ``password`` (argon2id) and is ``active``; the invite is
        used. InviteInvalid: unknown, used, expired, or its user disabled; WeakPassword
        (the invite stays usable)."""
        credentials.check_password(password, "")  # its length first, whatever the link
        token_hash = credentials.digest(token)
        rows = await self._fetch(
            "SELECT i.tenant, i.user_id, i.expires_ms, i.used_ms, u.email, u.status FROM "
            "portal_invites i JOIN portal_users u ON u.id = i.user_id AND u.tenant = i.tenant "
            "WHERE i.token_hash = ?", (token_hash,))
        now = self.clock()
        if not rows or rows[0][3] is not None or int(rows[0][2]) <= now or rows[0][5] == \
                "disabled":
            raise InviteInvalid("this invite link is unknown, used or expired: ask for a new one")
        tenant, user_id, email = rows[0][0], rows[0][1], rows[0][4]
        credentials.check_password(password, email)
        async with self._hashing:
            hashed = await asyncio.to_thread(self.passwords.hash, password)
        now = self.clock()
        try:
            await self._batch([
                self._step("UPDATE portal_invites SET used_ms = ? WHERE token_hash = ? AND "
                           "used_ms IS NULL AND expires_ms > ?", (now, token_hash, now),
                           need=True),
                self._step("UPDATE portal_users SET password_hash = ?, status = CASE WHEN "
                           "status = 'invited' THEN 'active' ELSE status END, "
                           "failed_logins = 0, locked_until_ms = 0, updated_ms = ? WHERE "
                           "tenant = ? AND id = ? AND status <> 'disabled'",
                           (hashed, now, tenant, user_id), need=True),
                self._end_sessions(tenant, user_id),  # a new password: log out everywhere
                self._audit(tenant, Actor(user_id), "invite.accept", detail={"user": user_id}),
            ])
        except NoRows:  # used, expired or disabled meanwhile
            raise InviteInvalid("this invite link is unknown, used or expired: ask for a "
                                "new one") from None
        return await self.user(tenant, user_id)

    async def password_hash(self, tenant: str, user_id: str) -> str | None:
        rows = await self._fetch("SELECT password_hash FROM portal_users WHERE tenant = ? AND "
                                 "id = ?", (tenant, user_id))
        if not rows:
            raise UnknownUser("no such user")
        return None if rows[0][0] is None else str(rows[0][0])

    # -- keys -------------------------------------------------------------------------------

    async def create_key(self, tenant: str, user_id: str, name: str = "", *,
                         actor: Actor = TENANT) -> tuple[ApiKey, str]:
        """A new key of the user: (its record, the key itself, to show once)."""
        name = _name(name)
        made = credentials.new_key()
        now = self.clock()
        try:
            await self._batch([
                self._step(
                    "INSERT INTO api_keys (id, tenant, user_id, created_by, prefix, key_hash, "
                    "name, created_ms) SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 "
                    "FROM portal_users WHERE tenant = ? AND id = ? AND status <> 'disabled') "
                    "AND NOT EXISTS (SELECT 1 FROM portal_operators WHERE tenant = ? AND "
                    "user_id = ?) AND (SELECT COUNT(*) FROM api_keys WHERE tenant = ? AND "
                    "user_id = ? AND revoked_ms IS NULL) < ?",
                    (made.id, tenant, user_id, actor.user, made.prefix, made.hash, name, now,
                     tenant, user_id, tenant, user_id, tenant, user_id, MAX_ACTIVE_KEYS),
                    need=True),
                self._audit(tenant, actor, "key.create",
                            detail={"user": user_id, "key": made.id, "name": name}),
            ])
        except NoRows:
            user = await self.user(tenant, user_id)  # UnknownUser
            if user.status == "disabled":
                raise UserDisabled("the user is disabled: enable it first") from None
            if user.role == "operator":
                raise OperatorUser("an operator has no buyer keys") from None
            raise TooManyKeys(f"a user has at most {MAX_ACTIVE_KEYS} keys that are not "
                              "revoked: revoke one first") from None
        key = ApiKey(made.id, tenant, user_id, name, made.prefix, actor.user, now, None, None)
        return key, made.key

    async def keys(self, tenant: str, user_id: str) -> list[ApiKey]:
        await self.user(tenant, user_id)  # UnknownUser
        rows = await self._fetch(f"SELECT {_KEY_COLS} FROM api_keys WHERE tenant = ? AND "  # noqa: S608
                                 "user_id = ? ORDER BY created_ms, id", (tenant, user_id))
        return [_key(r) for r in rows]

    async def key(self, tenant: str, key_id: str) -> ApiKey:
        rows = await self._fetch(f"SELECT {_KEY_COLS} FROM api_keys WHERE tenant = ? AND "  # noqa: S608
                                 "id = ?", (tenant, key_id))
        if not rows:
            raise UnknownKey("no such key")
        return _key(rows[0])

    async def revoke_key(self, tenant: str, key_id: str, *, actor: Actor = TENANT) -> ApiKey:
        """Revoked now (a key revoked before stays as it was: idempotent)."""
        with contextlib.suppress(NoRows):  # unknown (UnknownKey below), or revoked already
            await self._batch([
                self._step("UPDATE api_keys SET revoked_ms = ? WHERE tenant = ? AND id = ? "
                           "AND revoked_ms IS NULL", (self.clock(), tenant, key_id), need=True),
                self._audit(tenant, actor, "key.revoke", detail={"key": key_id}),
            ])
        return await self.key(tenant, key_id)

    async def principal(self, key: str) -> Principal | None:
        """Who the buyer key speaks for; None: malformed, unknown, revoked, or its user
        disabled or deleted (all a 401 to the caller)."""
        key_id = credentials.key_id(key)
        if key_id is None:
            return None
        key_hash = credentials.digest(key)
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        generation = self._generation
        rows = await self._fetch(
            "SELECT k.tenant, k.user_id, k.key_hash, k.last_used_ms, m.account FROM api_keys k "
            "JOIN portal_users u ON u.id = k.user_id AND u.tenant = k.tenant "
            "LEFT JOIN portal_user_accounts m ON m.user_id = k.user_id AND m.tenant = k.tenant "
            "WHERE k.id = ? AND k.revoked_ms IS NULL AND u.status <> 'disabled'", (key_id,))
        if not rows or not hmac.compare_digest(str(rows[0][2]), key_hash):
            return None
        tenant, user_id, _, last_used = rows[0][:4]
        found = Principal(tenant, user_id, key_id, frozenset(r[4] for r in rows if r[4]))
        now = self.clock()
        if last_used is None or now - int(last_used) >= LAST_USED_EVERY_MS:
            await self._db.batch([self._step("UPDATE api_keys SET last_used_ms = ? WHERE id = ?",
                                             (now, key_id))])
        # a revocation (or any change) committed while this lookup ran: not cached, so the
        # next lookup reads it (found by review)
        if self.key_cache_s > 0 and generation == self._generation:
            if len(self._cache) > 10_000:  # bounded: keys come and go
                self._cache.clear()
            self._cache[key_hash] = (time.monotonic() + self.key_cache_s, found)
        return found

    # -- logins and sessions ----------------------------------------------------------------

    def _end_sessions(self, tenant: str, user_id: str) -> Step:
        return self._step("DELETE FROM portal_sessions WHERE tenant = ? AND user_id = ?",
                          (tenant, user_id))

    async def _verify(self, stored: str | None, password: str) -> bool:
        """argon2id off the loop, at most two at a time. No stored hash (no such user, no
        password yet): a hash of a throwaway password is checked instead, so that a login
        takes as long whether the address exists or not."""
        async with self._hashing:
            if stored is None:
                if self._dummy is None:
                    self._dummy = await asyncio.to_thread(self.passwords.hash,
                                                          secrets.token_urlsafe(16))
                await asyncio.to_thread(self.passwords.verify, self._dummy, password)
                return False
            return await asyncio.to_thread(self.passwords.verify, stored, password)

    async def check_login(self, tenant: str, email: str, password: str, *,
                          throttle: LoginThrottle) -> User | None:
        """The active user of ``tenant`` with this e-mail and password, else None (one
        answer for an unknown address, a wrong password, a user not active and a user
        locked after ``throttle.max_failures`` failures in a row: the lock lasts
        ``throttle.lock_ms`` and is not lifted by the right password)."""
        address = normalize_email(email) or ""
        rows = await self._fetch(
            "SELECT id, password_hash, status, locked_until_ms FROM portal_users "
            "WHERE tenant = ? AND email = ?", (tenant, address)) if address else []
        now = self.clock()
        if not rows or rows[0][2] != "active" or int(rows[0][3]) > now:
            await self._verify(None, password)
            return None
        user_id, stored = str(rows[0][0]), rows[0][1]
        if await self._verify(None if stored is None else str(stored), password):
            steps = [self._step(
                "UPDATE portal_users SET failed_logins = 0, locked_until_ms = 0 "
                "WHERE tenant = ? AND id = ?", (tenant, user_id))]
            if stored is not None and self.passwords.needs_rehash(str(stored)):
                async with self._hashing:
                    fresh = await asyncio.to_thread(self.passwords.hash, password)
                steps.append(self._step(  # only if not changed meanwhile
                    "UPDATE portal_users SET password_hash = ? WHERE tenant = ? AND id = ? "
                    "AND password_hash = ?", (fresh, tenant, user_id, str(stored))))
            await self._batch(steps)
            return await self.user(tenant, user_id)
        now = self.clock()
        limit = throttle.max_failures
        steps = [self._step(
            "UPDATE portal_users SET "
            "locked_until_ms = CASE WHEN failed_logins + 1 >= ? THEN ? ELSE locked_until_ms END, "
            "failed_logins = CASE WHEN failed_logins + 1 >= ? THEN 0 ELSE failed_logins + 1 END "
            "WHERE tenant = ? AND id = ?",
            (limit, now + throttle.lock_ms, limit, tenant, user_id))]
        await self._batch(steps)
        locked = await self._fetch("SELECT locked_until_ms FROM portal_users WHERE tenant = ? "
                                   "AND id = ?", (tenant, user_id))
        if locked and int(locked[0][0]) > now:
            await self.audit(tenant, Actor(user_id), "login.locked",
                             detail={"user": user_id, "until_ms": int(locked[0][0])})
        return None

    async def start_session(self, tenant: str, user_id: str, *, ttl_ms: int) -> str:
        """A new session of the user: its token (the cookie's value, kept only as its
        SHA-256), valid ``ttl_ms`` at most (the absolute limit; the idle one is checked by
        :meth:`session`)."""
        token = credentials.new_session_token()
        now = self.clock()
        await self._batch([
            self._step("INSERT INTO portal_sessions (token_hash, tenant, user_id, created_ms, "
                       "last_seen_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?)",
                       (credentials.digest(token), tenant, user_id, now, now, now + ttl_ms)),
            self._audit(tenant, Actor(user_id), "session.login", detail={"user": user_id}),
        ])
        return token

    async def session(self, token: str, *, idle_ms: int) -> Principal | None:
        """Who the session speaks for (a Principal without a key, its user's mapped accounts
        read afresh), or None: unknown, past its absolute expiry, idle ``idle_ms`` or more,
        or its user no longer active. An expired session is deleted."""
        if not credentials.looks_like_session(token):
            return None
        token_hash = credentials.digest(token)
        rows = await self._fetch(
            "SELECT s.tenant, s.user_id, s.last_seen_ms, s.expires_ms, u.status, m.account, "
            "o.user_id FROM portal_sessions s JOIN portal_users u ON u.id = s.user_id AND "
            "u.tenant = s.tenant LEFT JOIN portal_user_accounts m ON m.user_id = s.user_id "
            "AND m.tenant = s.tenant LEFT JOIN portal_operators o ON o.user_id = s.user_id "
            "AND o.tenant = s.tenant WHERE s.token_hash = ?", (token_hash,))
        if not rows:
            return None
        tenant, user_id, last_seen, expires, status = rows[0][:5]
        now = self.clock()
        if status != "active" or now >= int(expires) or now - int(last_seen) >= idle_ms:
            await self._batch([self._step("DELETE FROM portal_sessions WHERE token_hash = ?",
                                          (token_hash,))])
            return None
        if now - int(last_seen) >= SESSION_TOUCH_MS:
            await self._db.batch([self._step(
                "UPDATE portal_sessions SET last_seen_ms = ? WHERE token_hash = ?",
                (now, token_hash))])
        return Principal(str(tenant), str(user_id), "", frozenset(r[5] for r in rows if r[5]),
                         operator=rows[0][6] is not None)

    async def end_session(self, token: str) -> None:
        """Logout: the session's row deleted (the cookie is cleared by the caller)."""
        token_hash = credentials.digest(token)
        rows = await self._fetch("SELECT tenant, user_id FROM portal_sessions WHERE "
                                 "token_hash = ?", (token_hash,))
        steps = [self._step("DELETE FROM portal_sessions WHERE token_hash = ?", (token_hash,))]
        if rows:
            steps.append(self._audit(str(rows[0][0]), Actor(str(rows[0][1])), "session.logout",
                                     detail={"user": str(rows[0][1])}))
        await self._batch(steps)


def _email(text: str) -> str:
    address = normalize_email(text)
    if address is None:
        raise InvalidInput("email: not an e-mail address", code="invalid_email")
    return address


def _accounts(accounts: Iterable[str]) -> list[str]:
    mapped = sorted(set(accounts))
    if len(mapped) > MAX_ACCOUNTS:
        raise InvalidInput(f"accounts: at most {MAX_ACCOUNTS}")
    return mapped


def _name(name: str) -> str:
    if len(name) > MAX_NAME or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        raise InvalidInput(f"name: at most {MAX_NAME} characters, no control characters",
                           code="invalid_name")
    return name


def _user(r: Sequence[Any], accounts: list[str]) -> User:
    return User(id=r[0], tenant=r[1], email=r[2], status=r[3], accounts=accounts,
                created_ms=int(r[4]), updated_ms=int(r[5]), has_password=bool(r[6]),
                role="operator" if r[7] else "buyer")


def _key(r: Sequence[Any]) -> ApiKey:
    return ApiKey(id=r[0], tenant=r[1], user_id=r[2], name=r[3], prefix=r[4], created_by=r[5],
                  created_ms=int(r[6]),
                  last_used_ms=None if r[7] is None else int(r[7]),
                  revoked_ms=None if r[8] is None else int(r[8]))
