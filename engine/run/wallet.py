"""The platform operator's credit of a tenant's platform-fee wallet (``leadflow wallet credit``).

A tenant's wallet is what it owes the platform: leads debit it their platform fees, and
the tenant funds it by card (``POST /v1/accounts/wallet/funds``). A payment the platform
receives another way (a wire, a check) is credited by the operator, who holds the config
and Redis, not by the tenant's API token (that would be free money against the fees). One
``adjust.lua`` step: the ledger entry (kind ``funding``, process ``operator``), the
balance, the resume of a wallet paused at its floor, idempotent on the payment's reference.
"""

from __future__ import annotations

from typing import NamedTuple

from engine.core import money
from engine.core.billing_errors import MoneyError
from engine.core.config import Config
from engine.core.constants import WALLET
from engine.store.store import Store

MAX_REF = 100


class CreditOutcome(NamedTuple):
    ok: bool
    message: str


_REFUSED = {
    "closed": "the wallet is closed",
    "unknown_account": "the tenant's wallet is not in Redis (has the engine run with this "
                       "config?)",
    "balance_limit": "the balance would pass +-$1,000,000,000",
}


async def credit_wallet(cfg: Config, store: Store, tenant: str, amount: str, *, ref: str,
                        note: str = "") -> CreditOutcome:
    """Credit ``amount`` (decimal dollars) to ``tenant``'s wallet once per ``ref``."""
    if tenant not in {t.id for t in cfg.tenants}:
        return CreditOutcome(False, f"unknown tenant {tenant!r}")
    if not 1 <= len(ref) <= MAX_REF:
        return CreditOutcome(False, f"--ref: 1 to {MAX_REF} characters")
    try:
        micros = money.parse(amount)
    except MoneyError as exc:
        return CreditOutcome(False, f"amount: {exc}")
    if micros <= 0:
        return CreditOutcome(False, "amount: must be positive")
    res = await store.adjust(
        tenant, WALLET, micros, "funding", op_id=f"operator:{ref}",
        extra={"process": "operator", "user": "operator", "reference": ref,
               "note": note[:200]},
        refuse_closed=True,
    )
    if not res.ok:
        return CreditOutcome(False, f"refused: {_REFUSED.get(res.error, res.error)}")
    if res.replay:
        if res.delta and int(res.delta) != micros:
            return CreditOutcome(False, f"refused: --ref {ref!r} was used for a credit of "
                                        f"{_usd(int(res.delta))}")
        return CreditOutcome(True, f"already credited with --ref {ref!r} (entry {res.entry}); "
                                   f"nothing moved, balance {_usd(int(res.balance))}")
    return CreditOutcome(True, f"credited {_usd(micros)} to {tenant}'s wallet (entry "
                               f"{res.entry}): balance {_usd(int(res.balance))}")


def _usd(micros: int) -> str:
    return ("-$" if micros < 0 else "$") + money.format(abs(micros))
