"""``leadflow reconcile``: every account's ledger sums to its balance, no balance is below
its floor (accounts in billing mode "none" have no floor), and every account the config
names is in Redis, and (ping-post) every account's ``held`` equals the sum of its open
holds with none past its expiry by more than the sweep interval.

Which accounts: the platform wallet and the clients of every tenant of the config (one
missing from Redis is a problem), every account in a tenant's account set, and the
accounts of tenants that are no longer in the config but still have an account set in
Redis (found with a SCAN for ``keys.accounts("*")``; their money is still there).

Every balance change of a tenant is an entry of its one ledger stream. Safe on a live
engine: a tenant's balances are read in one step with the stream's last id (a read-only
Lua script), and the ledgers are summed up to that id only, so a sale made meanwhile is in
neither. The stream is read once per tenant, newest first, in pages, down to its oldest
entry, summing each account's deltas. With the SQL archive (the ledger worker's), the
entries already trimmed from the stream are summed in SQL: trimming only ever removes a
stream's oldest entries, so what is read is one unbroken run of entries, and every entry
older than the oldest one read was trimmed, which the worker does only after its SQL
commit: one SQL sum per account of the entries older than that one completes its ledger,
none counted twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from engine.core import keys, money
from engine.core.config import Config, valid_id
from engine.core.constants import DEFAULT_FLOOR, WALLET
from engine.store.store import Store, now_ms

if TYPE_CHECKING:
    from billing.archive import Archive

PAGE = 1_000  # stream entries per XREVRANGE
SWEEP_INTERVAL_MS = 5_000  # the ping sweep's period (engine.run.workers): a hold may outlive
# its expiry by this much
_SQL_MAX_SEQ = 2**63 - 1  # largest stream id sequence SQL's BIGINT holds


class Finding(msgspec.Struct, frozen=True):
    tenant: str
    account: str
    problem: str


class AccountCheck(msgspec.Struct, frozen=True):
    tenant: str
    account: str
    balance: int
    ledger_sum: int
    configured: bool = True  # False: a tenant no longer in the config


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _before(entry_id: str) -> str:
    """The largest stream id below ``entry_id`` (as ``Archive.account_sum``'s ``upto``)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{_SQL_MAX_SEQ}"


async def _tail(store: Store, tenant: str, upto: str, page: int
                ) -> tuple[dict[str, int], str | None]:
    """Each account's sum of the tenant stream's entries up to ``upto``, read newest
    first; and the oldest id read (None when none was)."""
    sums: dict[str, int] = {}
    oldest = None
    async for rows in store.ledger_pages(tenant, upto, page=page):
        for entry_id, fields in rows:
            account = _text(fields[b"account"])
            sums[account] = sums.get(account, 0) + int(fields[b"delta"])
            oldest = _text(entry_id)
    return sums, oldest


class _Ledgers:
    """A tenant's ledger sums up to its snapshot's last id (see the module docs)."""

    def __init__(self, store: Store, archive: Archive | None, tenant: str) -> None:
        self.store, self.archive, self.tenant = store, archive, tenant
        self.sums: dict[str, int] = {}
        self.upto: str | None = None  # SQL sums entries up to this id; None: no entry ever

    async def read(self, last_id: str, page: int) -> None:
        if last_id == "0-0":  # no ledger stream: never an entry
            return
        self.sums, oldest = await _tail(self.store, self.tenant, last_id, page)
        self.upto = _before(oldest) if oldest is not None else last_id

    async def total(self, account: str) -> int:
        total = self.sums.get(account, 0)
        if self.archive is not None and self.upto is not None:
            archived, _ = await self.archive.account_sum(self.tenant, account, upto=self.upto)
            total += archived
        return total


async def _tenants_in_redis(store: Store) -> set[str]:
    """Tenants with an account set in Redis (every node of a cluster)."""
    pattern = keys.accounts("*")
    head, _, tail = pattern.partition("*")
    found: set[str] = set()
    async for raw in store.redis.scan_iter(match=pattern, count=1_000):
        key = _text(raw)
        tenant = key[len(head):len(key) - len(tail)]
        # the pattern's * also matches keys of another kind with ":accounts" in an id
        if valid_id(tenant) and keys.accounts(tenant) == key:
            found.add(tenant)
    return found


async def _holds(store: Store, tenant: str, account: str, held: int, sweep_interval_ms: int
                 ) -> list[Finding]:
    """Ping-post holds (docs/pingpost.md): the account's ``held`` is the sum of its open
    holds, and none is past its expiry by more than the sweep interval."""
    out = []
    rows: Any = await store.redis.zrange(keys.holds(tenant, account), 0, -1, withscores=True)
    total, now, late = 0, now_ms(), 0
    for member, expiry in rows:
        total += int(_text(member).rsplit("|", 1)[1])
        if expiry + sweep_interval_ms < now:
            late += 1
    if total != held:
        out.append(Finding(tenant, account, (
            f"held is {money.format(held)} but its open holds sum to {money.format(total)}")))
    if late:
        out.append(Finding(tenant, account, (
            f"{late} hold(s) past expiry by more than the sweep interval")))
    return out


async def reconcile(
    cfg: Config, store: Store, archive: Archive | None = None, *, page: int = PAGE,
    sweep_interval_ms: int = SWEEP_INTERVAL_MS,
) -> tuple[list[AccountCheck], list[Finding]]:
    checks: list[AccountCheck] = []
    findings: list[Finding] = []
    configured = {t.id: {WALLET} for t in cfg.tenants}  # tenant -> its accounts
    for c in cfg.clients:
        configured[c.tenant].add(c.id)
    others = sorted(await _tenants_in_redis(store) - configured.keys())
    for tenant in [*configured, *others]:
        expected = configured.get(tenant, set())
        listed = set(await store.account_ids(tenant))
        accounts = sorted(expected | listed)
        # in one step: the ledger's last id and the balances (reconcile_snapshot.lua)
        raw: Any = await store.lua.reconcile_snapshot(
            store.redis, [keys.ledger(tenant), *(keys.acct(tenant, a) for a in accounts)], [])
        ledgers = _Ledgers(store, archive, tenant)
        await ledgers.read(_text(raw[0]), page)
        for account, fields in zip(accounts, raw[1:], strict=True):
            if fields[0] is None:
                findings.append(Finding(tenant, account, (
                    "in the config but not in Redis" if account not in listed
                    else "in the tenant's account set but its account hash is missing")))
                continue
            if account not in listed:
                findings.append(Finding(tenant, account, "missing from the tenant's account set"))
            balance = int(fields[0])
            floor = int(fields[1]) if fields[1] else DEFAULT_FLOOR
            mode = _text(fields[2]) if fields[2] else "manual"
            total = await ledgers.total(account)
            checks.append(AccountCheck(tenant, account, balance, total,
                                       configured=tenant in configured))
            if total != balance:
                findings.append(Finding(tenant, account, (
                    f"ledger sums to {money.format(total)} but the balance is "
                    f"{money.format(balance)}")))
            findings += await _holds(store, tenant, account, int(fields[3] or 0),
                                     sweep_interval_ms)
            if mode != "none" and balance < floor:
                findings.append(Finding(tenant, account, (
                    f"balance {money.format(balance)} is below its floor "
                    f"{money.format(floor)}")))
    return checks, findings
