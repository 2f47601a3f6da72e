"""Ids of tenants, campaigns, buyers and accounts (engine.core.config.valid_id)."""

from __future__ import annotations

import pytest

from engine.core.config import valid_id


@pytest.mark.parametrize("value", ["c1", "acme-2", "a.b_c", "A" * 64])
def test_valid_ids(value: str) -> None:
    assert valid_id(value)


@pytest.mark.parametrize("value", ["", "-a", "a b", "c1\n", "c1\r\n", "\nc1", "A" * 65, "c1/x",
                                   "é"])
def test_invalid_ids(value: str) -> None:
    """A trailing newline too: a pattern ending in "$" let "c1\\n" through."""
    assert not valid_id(value)
