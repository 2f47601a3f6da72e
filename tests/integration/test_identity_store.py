"""The identity store on SQL (SQLite always, PostgreSQL when installed): users, invites,
passwords (argon2id), buyer keys (SHA-256 only), mappings, tenants kept apart, audit."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

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
    WeakPassword,
)
from engine.identity.store import MAX_ACTIVE_KEYS, IdentityStore, LoginThrottle

HOUR = 3_600_000
GOOD = "correct horse battery"
TABLES = ("portal_users", "portal_user_accounts", "portal_invites", "api_keys", "portal_audit",
          "portal_operators")
# cheap argon2 for the tests that are not about its cost (the default takes ~150 ms a hash)
FAST = Passwords(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


class Clock:
    def __init__(self, now: int = 1_800_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ids(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
              ) -> AsyncIterator[IdentityStore]:
    if request.param == "sqlite":
        store = await IdentityStore.open(f"sqlite:///{tmp_path / 'ids.sqlite3'}",
                                         path=tmp_path / "unused", clock=clock, passwords=FAST)
    else:
        store = await IdentityStore.open(request.getfixturevalue("postgres_url"),
                                         path=tmp_path / "unused", clock=clock, passwords=FAST)
        await store._db.fetch(f"TRUNCATE {', '.join(TABLES)}", [])
    yield store
    await store.close()


async def _rows(store: IdentityStore, table: str) -> list[tuple[object, ...]]:
    return await store._db.fetch(f"SELECT * FROM {table}", [])


async def test_invite_sets_an_argon2_password_once(ids: IdentityStore) -> None:
    user, invite = await ids.create_user("t1", "Ann@Example.COM", ["c1", "c2", "c1"],
                                         invite_ttl_ms=HOUR)
    assert user.email == "ann@example.com" and user.status == "invited"
    assert user.accounts == ["c1", "c2"] and not user.has_password
    assert await ids.password_hash("t1", user.id) is None
    # the token is stored as its SHA-256 only
    assert all(invite.token not in str(r) for r in await _rows(ids, "portal_invites"))
    assert (await _rows(ids, "portal_invites"))[0][0] == credentials.digest(invite.token)

    accepted = await ids.accept_invite(invite.token, GOOD)
    assert accepted.status == "active" and accepted.has_password
    stored = await ids.password_hash("t1", user.id)
    assert stored is not None and stored.startswith("$argon2id$") and GOOD not in stored
    assert ids.passwords.verify(stored, GOOD) and not ids.passwords.verify(stored, GOOD + "!")
    # one time: the link is spent, the password stays
    with pytest.raises(InviteInvalid):
        await ids.accept_invite(invite.token, "another long password")
    assert await ids.password_hash("t1", user.id) == stored
    with pytest.raises(InviteInvalid):
        await ids.accept_invite("no-such-token", GOOD)


async def test_default_hasher_is_argon2id(tmp_path: Path) -> None:
    store = await IdentityStore.open(None, path=tmp_path / "ids.sqlite3")
    try:
        user, invite = await store.create_user("t1", "a@example.com", [], invite_ttl_ms=HOUR)
        await store.accept_invite(invite.token, GOOD)
        stored = await store.password_hash("t1", user.id)
        assert stored is not None and re.match(r"\$argon2id\$v=19\$m=65536,t=3,p=4\$", stored)
    finally:
        await store.close()


async def test_a_login_rehashes_a_password_made_with_other_parameters(
        ids: IdentityStore) -> None:
    """argon2's parameters rise with the library (or the deployment's choice): a hash made
    with older ones is replaced at the next right login, never at a wrong one."""
    user, invite = await ids.create_user("t1", "old@example.com", [], invite_ttl_ms=HOUR)
    await ids.accept_invite(invite.token, GOOD)
    weaker = Passwords(PasswordHasher(time_cost=1, memory_cost=512, parallelism=1))
    await ids._db.fetch(f"UPDATE portal_users SET password_hash = {ids._db.ph} "
                        f"WHERE id = {ids._db.ph}", [weaker.hash(GOOD), user.id])
    old = await ids.password_hash("t1", user.id)
    assert old is not None and "m=512" in old
    assert await ids.check_login("t1", "old@example.com", "wrong password!",
                                 throttle=LoginThrottle()) is None
    assert await ids.password_hash("t1", user.id) == old
    assert await ids.check_login("t1", "old@example.com", GOOD, throttle=LoginThrottle())
    new = await ids.password_hash("t1", user.id)
    assert new is not None and new != old and "m=1024" in new and FAST.verify(new, GOOD)
    assert await ids.check_login("t1", "old@example.com", GOOD, throttle=LoginThrottle())
    assert await ids.password_hash("t1", user.id) == new  # current: left alone


async def test_expired_invite_is_refused(ids: IdentityStore, clock: Clock) -> None:
    user, invite = await ids.create_user("t1", "late@example.com", ["c1"], invite_ttl_ms=HOUR)
    clock.now += HOUR  # expires_ms is exclusive: at the hour it is over
    with pytest.raises(InviteInvalid):
        await ids.accept_invite(invite.token, GOOD)
    assert await ids.password_hash("t1", user.id) is None
    again = await ids.reinvite("t1", user.id, invite_ttl_ms=HOUR)
    clock.now += HOUR - 1
    assert (await ids.accept_invite(again.token, GOOD)).status == "active"


@pytest.mark.parametrize("password", [
    "short", "x" * 11, "x" * 257, "my bob@example.com pw!", "BOB@EXAMPLE.COMxyz",
])
async def test_password_rules(ids: IdentityStore, password: str) -> None:
    _, invite = await ids.create_user("t1", "bob@example.com", [], invite_ttl_ms=HOUR)
    with pytest.raises(WeakPassword):
        await ids.accept_invite(invite.token, password)
    # a refused password does not spend the invite
    assert (await ids.accept_invite(invite.token, "x" * 12)).has_password


async def test_password_bounds_are_inclusive() -> None:
    credentials.check_password("x" * 12, "a@example.com")
    credentials.check_password("é" * 256, "a@example.com")
    with pytest.raises(WeakPassword):
        credentials.check_password("é" * 257, "a@example.com")


async def test_emails_are_unique_per_tenant_and_checked(ids: IdentityStore) -> None:
    await ids.create_user("t1", "dup@example.com", [], invite_ttl_ms=HOUR)
    with pytest.raises(EmailTaken):
        await ids.create_user("t1", "DUP@example.com", ["c1"], invite_ttl_ms=HOUR)
    await ids.create_user("t2", "dup@example.com", [], invite_ttl_ms=HOUR)  # another tenant
    for bad in ("nope", "a@b", "a b@example.com", "x" * 250 + "@example.com", ""):
        with pytest.raises(InvalidInput):
            await ids.create_user("t1", bad, [], invite_ttl_ms=HOUR)
    # the refused duplicate left nothing: no mapping, no invite
    assert len(await _rows(ids, "portal_users")) == 2
    assert await _rows(ids, "portal_user_accounts") == []
    assert len(await _rows(ids, "portal_invites")) == 2


async def test_keys_are_stored_as_sha256_and_resolve_to_mapped_accounts(
        ids: IdentityStore) -> None:
    user, _ = await ids.create_user("t1", "k@example.com", ["c1"], invite_ttl_ms=HOUR)
    key, secret = await ids.create_key("t1", user.id, "crm export")
    assert credentials.KEY_PATTERN.fullmatch(secret) and secret.startswith(f"lfk_{key.id}_")
    assert key.prefix == secret[:len(key.prefix)] and len(key.prefix) == 4 + 16 + 1 + 4
    rows = await _rows(ids, "api_keys")
    assert len(rows) == 1 and all(secret not in str(c) for c in rows[0])
    assert credentials.digest(secret) in rows[0]
    p = await ids.principal(secret)
    assert p is not None and (p.tenant, p.user_id, p.key_id) == ("t1", user.id, key.id)
    assert p.accounts == {"c1"} and p.label == f"{user.id}/key:{key.id}"
    # last use, to the minute
    assert (await ids.key("t1", key.id)).last_used_ms == ids.clock()
    # the same id with another secret, a malformed key, nothing at all
    forged = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for wrong in (forged, secret + "x", "lfk_", "tok-t1", ""):
        assert await ids.principal(wrong) is None
    # the mappings are replaced, and the key follows at once
    await ids.update_user("t1", user.id, accounts=["c2", "c3"])
    p = await ids.principal(secret)
    assert p is not None and p.accounts == {"c2", "c3"}


async def test_revoked_disabled_deleted_keys_stop(ids: IdentityStore) -> None:
    user, invite = await ids.create_user("t1", "r@example.com", ["c1"], invite_ttl_ms=HOUR)
    k1, s1 = await ids.create_key("t1", user.id, "one")
    _, s2 = await ids.create_key("t1", user.id, "two")
    revoked = await ids.revoke_key("t1", k1.id)
    assert revoked.revoked_ms is not None
    assert (await ids.revoke_key("t1", k1.id)).revoked_ms == revoked.revoked_ms  # idempotent
    assert await ids.principal(s1) is None and await ids.principal(s2) is not None
    # disabled: its keys stop, its invite is void, no new key; enabled: back to invited
    disabled = await ids.update_user("t1", user.id, status="disabled")
    assert disabled.status == "disabled" and await ids.principal(s2) is None
    with pytest.raises(InviteInvalid):
        await ids.accept_invite(invite.token, GOOD)
    with pytest.raises(UserDisabled):
        await ids.create_key("t1", user.id)
    with pytest.raises(UserDisabled):
        await ids.reinvite("t1", user.id, invite_ttl_ms=HOUR)
    assert (await ids.update_user("t1", user.id, status="active")).status == "invited"
    assert await ids.principal(s2) is not None
    # deleted: keys revoked and kept, user and mappings gone
    assert await ids.delete_user("t1", user.id) == 1
    assert await ids.principal(s2) is None
    assert all(r[9] is not None for r in await _rows(ids, "api_keys"))
    assert await _rows(ids, "portal_user_accounts") == []
    with pytest.raises(UnknownUser):
        await ids.user("t1", user.id)
    with pytest.raises(UnknownUser):
        await ids.delete_user("t1", user.id)


async def test_tenants_never_reach_each_other(ids: IdentityStore) -> None:
    user, _ = await ids.create_user("t1", "x@example.com", ["c1"], invite_ttl_ms=HOUR)
    key, _ = await ids.create_key("t1", user.id)
    assert await ids.users("t2") == []
    for call in (ids.user("t2", user.id), ids.keys("t2", user.id),
                 ids.update_user("t2", user.id, status="disabled"),
                 ids.update_user("t2", user.id, accounts=["other"]),
                 ids.delete_user("t2", user.id), ids.create_key("t2", user.id),
                 ids.reinvite("t2", user.id, invite_ttl_ms=HOUR)):
        with pytest.raises(UnknownUser):
            await call
    for call2 in (ids.key("t2", key.id), ids.revoke_key("t2", key.id)):
        with pytest.raises(UnknownKey):
            await call2
    assert (await ids.user("t1", user.id)).accounts == ["c1"]
    assert (await ids.key("t1", key.id)).revoked_ms is None


async def test_key_limit_and_names(ids: IdentityStore) -> None:
    user, _ = await ids.create_user("t1", "n@example.com", [], invite_ttl_ms=HOUR)
    made = [await ids.create_key("t1", user.id, f"k{i}") for i in range(MAX_ACTIVE_KEYS)]
    with pytest.raises(TooManyKeys):
        await ids.create_key("t1", user.id)
    await ids.revoke_key("t1", made[0][0].id)
    await ids.create_key("t1", user.id, "ok again")
    for bad in ("x" * 101, "tab\there", "nul\x00"):
        with pytest.raises(InvalidInput):
            await ids.create_key("t1", user.id, bad)
    assert len(await ids.keys("t1", user.id)) == MAX_ACTIVE_KEYS + 1


async def test_reinvite_voids_the_older_link(ids: IdentityStore) -> None:
    user, first = await ids.create_user("t1", "re@example.com", [], invite_ttl_ms=HOUR)
    second = await ids.reinvite("t1", user.id, invite_ttl_ms=HOUR)
    with pytest.raises(InviteInvalid):
        await ids.accept_invite(first.token, GOOD)
    await ids.accept_invite(second.token, GOOD)
    # an active user's new link sets a new password (a reset by the tenant)
    third = await ids.reinvite("t1", user.id, invite_ttl_ms=HOUR)
    await ids.accept_invite(third.token, "another good password")
    stored = await ids.password_hash("t1", user.id)
    assert stored is not None and ids.passwords.verify(stored, "another good password")


async def test_audit_trail(ids: IdentityStore) -> None:
    user, invite = await ids.create_user("t1", "au@example.com", ["c1"], invite_ttl_ms=HOUR)
    key, _ = await ids.create_key("t1", user.id, "k")
    await ids.accept_invite(invite.token, GOOD)
    await ids.revoke_key("t1", key.id)
    await ids.delete_user("t1", user.id)
    rows = await ids.audit_rows("t1")
    actions = sorted(r["action"] for r in rows)
    assert actions == sorted(["user.create", "key.create", "invite.accept", "key.revoke",
                              "user.delete"])
    accept = next(r for r in rows if r["action"] == "invite.accept")
    assert accept["actor"] == user.id
    assert next(r for r in rows if r["action"] == "user.create")["actor"] == "tenant"
    assert await ids.audit_rows("t2") == []


async def test_key_cache_keeps_an_answer_its_ttl(tmp_path: Path) -> None:
    """With key_cache_s, a revocation made by another process (another store on the same
    database) takes effect here once the kept answer is older than the TTL; made through
    this store, at once."""
    path = tmp_path / "ids.sqlite3"
    here = await IdentityStore.open(None, path=path, passwords=FAST, key_cache_s=3600)
    there = await IdentityStore.open(None, path=path, passwords=FAST)
    try:
        user, _ = await here.create_user("t1", "c@example.com", ["c1"], invite_ttl_ms=HOUR)
        k1, s1 = await here.create_key("t1", user.id)
        k2, s2 = await here.create_key("t1", user.id)
        assert await here.principal(s1) is not None and await here.principal(s2) is not None
        await there.revoke_key("t1", k1.id)
        assert await there.principal(s1) is None
        assert await here.principal(s1) is not None  # kept: the TTL has not passed
        here._cache = {h: (0.0, p) for h, (_, p) in here._cache.items()}  # the TTL passed
        assert await here.principal(s1) is None
        await here.revoke_key("t1", k2.id)  # through this store: forgotten at once
        assert await here.principal(s2) is None
    finally:
        await here.close()
        await there.close()


async def test_a_revocation_racing_a_key_lookup_is_not_cached_away(tmp_path: Path) -> None:
    """Found by review: a lookup that read the key before a revocation in the same process
    committed wrote its answer to the cache after the revocation cleared it, and the
    revoked key kept working for key_cache_s."""
    ids = await IdentityStore.open(f"sqlite:///{tmp_path / 'ids.sqlite3'}",
                                   path=tmp_path / "unused", passwords=FAST, key_cache_s=60)
    try:
        user, _ = await ids.create_user("t1", "a@b.example", ["c1"], invite_ttl_ms=HOUR)
        key, secret = await ids.create_key("t1", user.id)
        fetch, raced = ids._fetch, []

        async def fetch_then_revoke(sql: str, params: Any = ()) -> Any:
            rows = await fetch(sql, params)
            if "FROM api_keys k" in sql and not raced:
                raced.append(1)
                await ids.revoke_key("t1", key.id)
            return rows

        ids._fetch = fetch_then_revoke  # type: ignore[method-assign]
        assert await ids.principal(secret) is not None  # it read the key before the revoke
        ids._fetch = fetch  # type: ignore[method-assign]
        assert await ids.principal(secret) is None
    finally:
        await ids.close()


async def test_operators_and_the_notify_addresses_of_an_account(ids: IdentityStore) -> None:
    """An operator: its role read back everywhere, no account, no key, its session marked;
    notify_addresses: the active users mapped to the account (not invited,
    disabled, deleted ones, nor another tenant's)."""
    ops, invite = await ids.create_user("t1", "ops@example.com", [], invite_ttl_ms=HOUR,
                                        role="operator")
    await ids.accept_invite(invite.token, "correct horse battery")
    assert ops.role == "operator" and (await ids.user("t1", ops.id)).role == "operator"
    with pytest.raises(OperatorUser):
        await ids.create_key("t1", ops.id, "k")
    with pytest.raises(OperatorUser):
        await ids.update_user("t1", ops.id, accounts=["c1"])
    with pytest.raises(OperatorUser):
        await ids.create_user("t1", "ops2@example.com", ["c1"], invite_ttl_ms=HOUR,
                              role="operator")
    token = await ids.start_session("t1", ops.id, ttl_ms=HOUR)
    p = await ids.session(token, idle_ms=HOUR)
    assert p is not None and p.operator and p.accounts == frozenset()

    made = []
    for email, accounts in (("a@example.com", ["c1"]), ("b@example.com", ["c1", "c2"]),
                            ("off@example.com", ["c1"]), ("gone@example.com", ["c1"]),
                            ("c2@example.com", ["c2"])):
        user, invite = await ids.create_user("t1", email, accounts, invite_ttl_ms=HOUR)
        await ids.accept_invite(invite.token, "correct horse battery")
        made.append(user.id)
    await ids.create_user("t1", "new@example.com", ["c1"], invite_ttl_ms=HOUR)  # invited
    await ids.create_user("t2", "t2@example.com", ["c1"], invite_ttl_ms=HOUR)
    await ids.update_user("t1", made[2], status="disabled")
    await ids.delete_user("t1", made[3])
    assert sorted(await ids.notify_addresses("t1", "c1")) == ["a@example.com", "b@example.com"]
    roles = {u.email: u.role for u in await ids.users("t1")}
    assert roles.pop("ops@example.com") == "operator" and set(roles.values()) == {"buyer"}
    await ids.delete_user("t1", ops.id)
    assert await _rows(ids, "portal_operators") == []
