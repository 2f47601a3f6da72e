"""`config check` refusals: every bad config is a ConfigError naming the file, the path
inside it and the reason (exit 2 from `leadflow config check`), never another exception."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from tests.harness import BASE_TOML, buyer, campaign, make_config


def _refused(toml: str, path: str, reason: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        make_config(base=toml)
    err = info.value
    assert (err.source, err.path) == ("<test>", path), str(err)
    assert reason in err.reason, str(err)
    return err


# -- opening balance and floor ---------------------------------------------------------------

def test_a_client_cannot_open_below_its_floor() -> None:
    toml = BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                             'id = "c1"\nopening_balance = "-500.00"')
    _refused(toml, "clients[0].opening_balance", "below the floor -20.00")


def test_the_wallet_cannot_open_below_its_floor() -> None:
    toml = BASE_TOML.replace('opening_balance = "1000.00"',
                             'opening_balance = "-100.00"')
    _refused(toml, "tenants[0].wallet.opening_balance", "below the floor -20.00")


def test_an_opening_balance_at_the_floor_or_of_a_none_account_is_accepted() -> None:
    make_config(base=BASE_TOML.replace('opening_balance = "100.00"',
                                       'opening_balance = "-20.00"'))
    # billing "none" has no floor (its debits are never refused; reconcile skips it)
    make_config(base=BASE_TOML.replace('opening_balance = "5.00"',
                                       'opening_balance = "-500.00"\nbilling = "none"'))
    _refused(BASE_TOML.replace('id = "c1"\nopening_balance = "100.00"',
                               'id = "c1"\nopening_balance = "-5.00"\nfloor = "0.00"'),
             "clients[0].opening_balance", "below the floor 0.00")


def test_the_harness_config_passes() -> None:
    make_config(campaign(), buyer("b1"))
