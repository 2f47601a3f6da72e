"""``leadflow reconcile``: every account's ledger sums to its balance, no balance is below
its floor (accounts in billing mode "none" have no floor), and every account the config
names is in Redis.

Which accounts: the platform wallet and the clients of every tenant of the config (one
missing from Redis is a problem), every account in a tenant's account set, and the
accounts of tenants that are no longer in the config but still have an account set in
Redis (found with a SCAN for ``keys.accounts("*")``; their money is still there).

Safe on a live engine: an account's balance is read in one step with its ledger stream's
last id (a read-only Lua script), and the ledger is summed up to that id only, so a sale
made meanwhile is in neither. With the SQL archive (the ledger worker's), the entries
already trimmed from the account stream are summed in SQL: the stream is read newest first,
in pages, down to its oldest entry. Trimming only ever removes a stream's oldest entries,
so what is read is one unbroken run of entries, and every entry older than the oldest one
read was trimmed, which the worker does only after its SQL commit: one SQL sum of the
entries older than that one completes the ledger, none counted twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from billing import money
from engine import keys
from engine.config import WALLET, Config, valid_id
from engine.store import DEFAULT_FLOOR, Store

if TYPE_CHECKING:
    from billing.archive import Archive

PAGE = 1_000  # stream entries per XREVRANGE
_SQL_MAX_SEQ = 2**63 - 1  # largest stream id sequence SQL's BIGINT holds

# One account in one step: its balance fields and the last id ever written to its ledger
# stream ("0-0" when it has none). last-generated-id, not the last entry: the archive may
# have trimmed the stream empty.
_SNAPSHOT = """
local v = redis.call('HMGET', KEYS[1], 'bal', 'floor', 'mode')
local last = '0-0'
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
return {v[1], v[2], v[3], last}
"""


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


async def _tail(store: Store, key: str, upto: str, page: int) -> tuple[int, str | None]:
    """Sum of the stream's entries up to ``upto``, read newest first; and the oldest id
    read (None when none was)."""
    total, oldest, end = 0, None, upto
    while True:
        rows: Any = await store.redis.xrevrange(key, end, "-", count=page)
        for entry_id, fields in rows:
            total += int(fields[b"delta"])
            oldest = _text(entry_id)
        if len(rows) < page or oldest is None:
            return total, oldest
        end = "(" + oldest


async def _ledger_sum(store: Store, archive: Archive | None, tenant: str, account: str,
                      last_id: str, page: int) -> int:
    """The account's ledger up to ``last_id``: its stream, plus what was archived to SQL
    and trimmed from it (see the module docs)."""
    if last_id == "0-0":  # no ledger stream: never an entry
        return 0
    total, oldest = await _tail(store, keys.acct_ledger(tenant, account), last_id, page)
    if archive is not None:
        archived, _ = await archive.account_sum(
            tenant, account, upto=_before(oldest) if oldest is not None else last_id)
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


async def reconcile(
    cfg: Config, store: Store, archive: Archive | None = None, *, page: int = PAGE
) -> tuple[list[AccountCheck], list[Finding]]:
    snapshot = store.redis.register_script(_SNAPSHOT)
    checks: list[AccountCheck] = []
    findings: list[Finding] = []
    configured = {t.id: {WALLET} for t in cfg.tenants}  # tenant -> its accounts
    for c in cfg.clients:
        configured[c.tenant].add(c.id)
    others = sorted(await _tenants_in_redis(store) - configured.keys())
    for tenant in [*configured, *others]:
        expected = configured.get(tenant, set())
        listed = set(await store.account_ids(tenant))
        for account in sorted(expected | listed):
            raw: Any = await snapshot(keys=[keys.acct(tenant, account),
                                            keys.acct_ledger(tenant, account)])
            if raw[0] is None:
                findings.append(Finding(tenant, account, (
                    "in the config but not in Redis" if account not in listed
                    else "in the tenant's account set but its account hash is missing")))
                continue
            if account not in listed:
                findings.append(Finding(tenant, account, "missing from the tenant's account set"))
            balance = int(raw[0])
            floor = int(raw[1]) if raw[1] else DEFAULT_FLOOR
            mode = _text(raw[2]) if raw[2] else "manual"
            total = await _ledger_sum(store, archive, tenant, account, _text(raw[3]), page)
            checks.append(AccountCheck(tenant, account, balance, total,
                                       configured=tenant in configured))
            if total != balance:
                findings.append(Finding(tenant, account, (
                    f"ledger sums to {money.format(total)} but the balance is "
                    f"{money.format(balance)}")))
            if mode != "none" and balance < floor:
                findings.append(Finding(tenant, account, (
                    f"balance {money.format(balance)} is below its floor "
                    f"{money.format(floor)}")))
    return checks, findings
