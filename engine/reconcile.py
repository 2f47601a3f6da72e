"""``leadflow reconcile``: every account's ledger sums to its balance, no balance is below
its floor (accounts in billing mode "none" have no floor)."""

from __future__ import annotations

import msgspec

from billing import money
from engine.config import Config
from engine.store import Store


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


async def reconcile(cfg: Config, store: Store) -> tuple[list[AccountCheck], list[Finding]]:
    checks: list[AccountCheck] = []
    findings: list[Finding] = []
    for tenant in cfg.tenants:
        for account in await store.account_ids(tenant.id):
            state = await store.account(tenant.id, account)
            if state is None:
                findings.append(Finding(tenant.id, account, "listed but missing"))
                continue
            total, n = await store.ledger_sum(tenant.id, account)
            checks.append(AccountCheck(tenant.id, account, state.balance, total, n))
            if total != state.balance:
                findings.append(
                    Finding(
                        tenant.id,
                        account,
                        (
                            f"ledger sums to {money.format(total)} but the balance is "
                            f"{money.format(state.balance)}"
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
