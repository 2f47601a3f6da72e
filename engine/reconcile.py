"""``leadflow reconcile``: every account's ledger sums to its balance, no balance is below
its floor (accounts in billing mode "none" have no floor).

With the SQL archive (the ledger worker's), an account's ledger is the archived rows plus
the stream entries not archived yet; the check reads both in one snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from billing import money
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


async def _ledger_sum(store: Store, archive: Archive | None, tenant: str, account: str) -> int:
    if archive is None:
        total, _ = await store.ledger_sum(tenant, account)
        return total
    from billing.archive import reconcile as archive_reconcile

    r = await archive_reconcile(store, archive, tenant, account)
    return r.sql_sum + r.unarchived_sum


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
            total = await _ledger_sum(store, archive, tenant.id, account)
            checks.append(AccountCheck(tenant.id, account, state.balance, total))
            if total != state.balance:
                findings.append(Finding(tenant.id, account, (
                    f"ledger sums to {money.format(total)} but the balance is "
                    f"{money.format(state.balance)}")))
            if state.mode != "none" and state.balance < state.floor:
                findings.append(Finding(tenant.id, account, (
                    f"balance {money.format(state.balance)} is below its floor "
                    f"{money.format(state.floor)}")))
    return checks, findings
