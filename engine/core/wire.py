"""How values look on the wire, as msgspec annotations the API's Structs share (engine's and
billing's): they describe a value in the OpenAPI document (``extra_json_schema``) and add no
check to decoding (the handlers' parsing stays the one refusal, with its codes)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

# A decimal amount as a request carries it: ASCII digits, an optional minus, at most 6
# decimals and 10 whole digits (engine.core.money.parse, which also caps it at 1e9).
MONEY_PATTERN = r"^-?[0-9]{1,10}(\.[0-9]{1,6})?$"
Money = Annotated[str, Meta(extra_json_schema={
    "pattern": MONEY_PATTERN, "examples": ["25.00"],
    "description": "a decimal amount of ASCII digits, at most 6 decimals"})]
# An amount as the API writes it (engine.core.money.format): at least two decimals.
MONEY_OUT_PATTERN = r"^-?[0-9]+\.[0-9]{2,6}$"
MoneyOut = Annotated[str, Meta(extra_json_schema={
    "pattern": MONEY_OUT_PATTERN, "examples": ["25.00"]})]
# A ledger entry id: a Redis stream id, "<ms>-<seq>".
ENTRY_ID_PATTERN = r"^[0-9]+-[0-9]+$"
EntryId = Annotated[str, Meta(extra_json_schema={
    "pattern": ENTRY_ID_PATTERN, "examples": ["1795260729354-0"]})]
