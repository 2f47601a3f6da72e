"""Provisioning: the accounts of a config created in Redis, or given its settings."""

from __future__ import annotations

from billing.policy import effective, threshold_flags
from engine.core import money
from engine.core.config import Account, Config
from engine.core.constants import WALLET
from engine.store.store import Store


async def provision_accounts(cfg: Config, store: Store) -> int:
    """Create missing accounts (with their opening balance) and update settings of the
    others, each applied to its account's state in the same step (account_settings.lua:
    pause or resume for the floor and the minimum balance, ``balance_alert`` /
    ``recharge_needed`` when a threshold now lies above the balance). Auto-recharge set
    through the API outlives reloads and restarts (it is stored beside the account and wins
    over the file). Returns how many were created."""
    created = 0
    for t in cfg.tenants:
        accounts: list[tuple[str, Account, str]] = [(WALLET, t.wallet, "manual")]
        accounts += [(c.id, c, c.billing) for c in cfg.clients if c.tenant == t.id]
        for account_id, a, mode in accounts:
            armed, threshold = threshold_flags(
                await effective(store, t.id, account_id, a.auto_recharge))
            created += await store.apply_account_settings(
                t.id,
                account_id,
                opening=money.parse(a.opening_balance),
                floor=money.parse(a.floor),
                alert=money.parse(a.alert),
                recharge_threshold=threshold,
                auto_recharge=armed,
                min_balance=None if a.min_balance is None else money.parse(a.min_balance),
                mode=mode,
            )
    return created
