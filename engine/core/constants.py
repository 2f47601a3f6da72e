"""One constant per fact that several layers (and the Lua scripts) share."""

from __future__ import annotations

from pathlib import Path

WALLET = "wallet"  # the reserved account id of a tenant's platform-fee wallet
# seed 000: at $0.00 an account accrues a negative balance, at most -$20.00; the floor of
# an account that names none (the config's default, config check's bound, _lib.lua's)
DEFAULT_FLOOR = -20_000_000  # micros
# keys.sold (sales and settled deliveries for the lead archive, billing.leads) keeps about
# this many entries if never archived
SOLD_MAXLEN = 1_000_000
ARCHIVE_FILE = "ledger.sqlite3"  # the SQLite ledger archive's file in the state directory


def archive_path(state_dir: str | Path) -> Path:
    """The default SQLite ledger archive of a state directory (without ``sql_url``)."""
    return Path(state_dir) / ARCHIVE_FILE
