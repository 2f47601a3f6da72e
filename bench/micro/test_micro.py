"""Micro-benchmarks of the lead hot path, with pytest-benchmark. Opt-in, never in the default
test run (``testpaths = tests``, ``--benchmark-skip``). Run them with::

    python -m pytest bench/micro --benchmark-only -p no:cacheprovider

(``--benchmark-only`` overrides the ``--benchmark-skip`` of the repository's addopts.)
Cases: decode + validate one solar lead (engine.routing.fields.CampaignSchema), the routing decision
in Python (CampaignPlan.eligible + ordered, and the whole Lua lead dict of engine.ingest.ingest),
msgspec encoding of a Lua batch of 64 leads and of a lead response.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pytest

from bench import common
from engine.ingest.batcher import encode_call
from engine.ingest.codes import LeadResponse
from engine.ingest.ingest import Ingest, LuaLead, new_lead_id
from engine.routing.plans import CampaignPlan
from engine.routing.runtime import Runtime, SupplierPlan
from engine.run.demo import make_lead
from engine.store.lua_protocol import Call, decode_lead


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

    def lua_lead(self) -> LuaLead:
        """What the engine hands the batcher (engine.ingest.ingest.LuaLead)."""
        return self.ingest._lua_lead(self.plan, self.values, self.data, new_lead_id(), False,
                                     self.windows, self.local, self.raw, self.supplier,
                                     None)[0]


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


def test_lua_lead_dict(benchmark: Any, case: Case) -> None:
    lead = decode_lead(benchmark(case.lua_lead).json)
    assert lead.campaign == "solar" and lead.candidates


def test_encode_lua_batch_of_64(benchmark: Any, case: Case) -> None:
    leads = [case.lua_lead() for _ in range(64)]
    items = [(lead.json, lead.payload, lead.candidates, None) for lead in leads]

    def run() -> bytes:  # as the batcher encodes a call
        return encode_call(items, time.time_ns() // 1_000_000)  # type: ignore[arg-type]

    out = benchmark(run)
    leads = msgspec.json.decode(out, type=Call).leads
    assert isinstance(leads, list) and len(leads) == 64


def test_encode_response(benchmark: Any) -> None:
    enc = msgspec.json.Encoder()
    resp = LeadResponse(status="ACCEPTED", code=0, message="lead accepted",
                        lead_id=new_lead_id(), payout="8.00")
    assert benchmark(enc.encode, resp).startswith(b'{"status":"ACCEPTED"')
