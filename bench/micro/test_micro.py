"""Micro-benchmarks of the lead hot path, with pytest-benchmark. Opt-in, never in the default
test run (``testpaths = tests``, ``--benchmark-skip``). Run them with::

    python -m pytest bench/micro --benchmark-only -p no:cacheprovider

(``--benchmark-only`` overrides the ``--benchmark-skip`` of the repository's addopts.)
Cases: decode + validate one solar lead (engine.fields.CampaignSchema), the routing decision
in Python (CampaignPlan.eligible + ordered, and the whole Lua lead dict of engine.ingest),
msgspec encoding of a Lua batch of 64 leads and of a lead response.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pytest

from bench import common
from engine.demo import make_lead
from engine.ingest import Ingest, LeadResponse, new_lead_id
from engine.routing import CampaignPlan
from engine.runtime import Runtime, SupplierPlan
from engine.store import WALLET


class Case:
    def __init__(self) -> None:
        cfg = common.load_config()
        self.rt = Runtime(cfg)
        self.plan: CampaignPlan = self.rt.campaigns["solar"]
        self.supplier: SupplierPlan = self.rt.suppliers["aff-101"]
        self.ingest = Ingest(lambda: self.rt, lambda _t: None)  # type: ignore[arg-type,return-value]
        self.windows, self.local = self.ingest._clock.get(self.plan.tz, time.time())
        self.today = self.local.date()
        rng = random.Random(7)
        keys = common.supplier_keys(cfg)
        for n in range(10_000):  # the first valid solar lead that some buyer takes
            lead = make_lead(rng, n)
            if lead["lp_campaign_id"] != "solar" or lead["lp_supplier_id"] != "aff-101":
                continue
            lead["lp_key"] = keys["aff-101"]
            values, errors = self.plan.schema.validate(lead, today=self.today)
            if not errors and len(self.plan.eligible(values, self.local)) >= 2:
                self.data: dict[str, Any] = lead
                self.values = values
                self.raw = msgspec.json.encode(lead)
                return
        raise RuntimeError("no valid solar lead generated")

    def lua_lead(self) -> Any:
        """What the engine hands the batcher: a dict, or the lead's JSON already encoded."""
        return self.ingest._lua_lead(self.plan, self.values, self.data, new_lead_id(), False,
                                     self.windows, self.local, self.raw, self.supplier, None)


@pytest.fixture(scope="module")
def case() -> Case:
    return Case()


def test_decode_and_validate(benchmark: Any, case: Case) -> None:
    schema, raw, today = case.plan.schema, case.raw, case.today

    def run() -> tuple[dict[str, str], list[Any]]:
        return schema.validate(msgspec.json.decode(raw), today=today)

    values, errors = benchmark(run)
    assert not errors and values["email"]


def test_routing_eligible_ordered(benchmark: Any, case: Case) -> None:
    plan, values, local, rng = case.plan, case.values, case.local, random.Random(1)

    def run() -> list[int]:
        return plan.ordered(plan.eligible(values, local), rng)

    assert len(benchmark(run)) >= 2


def _as_dict(lead: Any) -> dict[str, Any]:
    return msgspec.json.decode(lead) if isinstance(lead, bytes | str) else lead  # type: ignore[no-any-return]


def test_lua_lead_dict(benchmark: Any, case: Case) -> None:
    lead = _as_dict(benchmark(case.lua_lead))
    assert lead["c"] == "solar" and lead["cs"]


def test_encode_lua_batch_of_64(benchmark: Any, case: Case) -> None:
    enc = msgspec.json.Encoder()
    leads = [case.lua_lead() for _ in range(64)]
    wallet = WALLET.encode()

    def run() -> bytes:
        now = time.time_ns() // 1_000_000
        if isinstance(leads[0], bytes):  # pre-encoded leads: joined as the batcher joins them
            return b'{"now":%d,"w":"%s","leads":[%s]}' % (now, wallet, b",".join(leads))
        return enc.encode({"now": now, "w": WALLET, "leads": leads})

    out = benchmark(run)
    assert len(msgspec.json.decode(out)["leads"]) == 64


def test_encode_response(benchmark: Any) -> None:
    enc = msgspec.json.Encoder()
    resp = LeadResponse(status="ACCEPTED", code=0, message="lead accepted",
                        lead_id=new_lead_id(), payout="8.00")
    assert benchmark(enc.encode, resp).startswith(b'{"status":"ACCEPTED"')
