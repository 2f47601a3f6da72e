"""``leadflow reconcile``: every account's ledger sums to its balance, no balance is below
its floor (accounts in billing mode "none" have no floor).

The ledger worker (``leadflow run`` starts one in-process) copies ledger entries to SQL and
then trims them from Redis, so with an ``archive`` an account's ledger is its archived
entries plus the ones still in its Redis stream and not yet archived
(:func:`billing.archive.reconcile`, one Redis snapshot). Without one, only Redis is read:
right for an engine that never ran the ledger worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from billing import money
from engine import keys
from engine.config import Config
from engine.store import Store

if TYPE_CHECKING:
    from billing.archive import Archive


class Finding(msgspec.Struct, frozen=True):
    tenant: str
    account: str
    problem: str


class AccountCheck(msgspec.Struct, frozen=True):
    tenant: str
    account: str
    balance: int
    ledger_sum: int
    entries: int


async def reconcile(
    cfg: Config, store: Store, archive: Archive | None = None
) -> tuple[list[AccountCheck], list[Finding]]:
    checks: list[AccountCheck] = []
    findings: list[Finding] = []
    for tenant in cfg.tenants:
        for account in await store.account_ids(tenant.id):
            state = await store.account(tenant.id, account)
            if state is None:
                findings.append(Finding(tenant.id, account, "listed but missing"))
                continue
            balance = state.balance
            if archive is None:
                total, n = await store.ledger_sum(tenant.id, account)
            else:
                total, n, balance = await _archived_sum(store, archive, tenant.id, account)
            checks.append(AccountCheck(tenant.id, account, balance, total, n))
            if total != balance:
                findings.append(
                    Finding(
                        tenant.id,
                        account,
                        (
                            f"ledger sums to {money.format(total)} but the balance is "
                            f"{money.format(balance)}"
                        ),
                    )
                )
            if state.mode != "none" and state.balance < state.floor:
                findings.append(
                    Finding(
                        tenant.id,
                        account,
                        (
                            f"balance {money.format(state.balance)} is below its floor "
                            f"{money.format(state.floor)}"
                        ),
                    )
                )
    return checks, findings


async def _archived_sum(
    store: Store, archive: Archive, tenant: str, account: str
) -> tuple[int, int, int]:
    """(ledger sum, entries, balance): SQL archive + Redis entries not yet archived."""
    from billing.archive import reconcile as archive_reconcile

    rec = await archive_reconcile(store, archive, tenant, account)
    _, archived = await archive.account_sum(tenant, account)
    ids = [i for i, _ in await store.stream_range(keys.acct_ledger(tenant, account), "-", "+")]
    unarchived = len(set(ids) - await archive.archived(tenant, ids))
    return rec.sql_sum + rec.unarchived_sum, archived + unarchived, rec.redis_balance
