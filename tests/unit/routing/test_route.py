"""CampaignPlan.route (the window plan, one pass) against eligible + ordered, the
definition it replaces on the hot path: the same buyers, in the same order up to the
waterfall's random tie-break within one priority."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.routing.runtime import Runtime
from tests.helpers.harness import buyer, campaign, make_config

STATES = ["CA", "TX", "NY", "AK"]
FILTERS = ["", 'filters = [{ field = "state", op = "states", values = ["CA", "TX"] }]',
           'filters = [{ field = "state", op = "states", values = ["AK"], action = "block" }]',
           'filters = [{ field = "phone", op = "regex", pattern = "^555" }]']
SCHEDULES = ["", 'schedule = { days = ["mon", "wed"], start = "09:00", end = "17:00" }',
             'schedule = { start = "22:00", end = "06:00" }']
METHODS = ["waterfall", "highest_price", "exclusive", "send_to_all", "round_robin",
           "weighted_round_robin"]


@st.composite
def plans(draw: st.DrawFn) -> tuple[str, list[str]]:
    method = draw(st.sampled_from(METHODS))
    n = draw(st.integers(1, 14))
    parts = [campaign(distribution=method)]
    for i in range(n):
        status = 'status = "paused"' if draw(st.booleans()) and i % 5 == 4 else ""
        extra = "\n".join(x for x in (draw(st.sampled_from(FILTERS)),
                                      draw(st.sampled_from(SCHEDULES)), status) if x)
        parts.append(buyer(f"b{i}", price=f"{draw(st.integers(1, 4))}.00",
                           priority=draw(st.integers(1, 3)), weight=draw(st.integers(1, 5)),
                           extra=extra))
    return method, parts


@settings(max_examples=150, deadline=None)
@given(plans(), st.sampled_from(STATES), st.sampled_from(["5551234567", "2125550000"]),
       st.integers(0, 7 * 24 * 60 - 1))
def test_route_is_eligible_then_ordered(plan_parts: tuple[str, list[str]], state: str,
                                        phone: str, minute: int) -> None:
    method, parts = plan_parts
    plan = Runtime(make_config(*parts)).campaigns["camp"]
    lead = {"email": "a@b.example", "state": state, "phone": phone}
    local = datetime(2026, 1, 5, tzinfo=ZoneInfo("UTC")) + timedelta(minutes=minute)  # a Monday
    want = plan.ordered(plan.eligible(lead, local), random.Random(1))
    got = plan.route(lead, local, random.Random(1))
    assert sorted(got) == sorted(want)
    if method == "waterfall":  # ties broken at random: the priorities are what is fixed
        assert [plan.buyers[i].priority for i in got] == [plan.buyers[i].priority for i in want]
    else:
        assert got == want
    # the window plan is cached per minute: the next lead of that minute gets the same
    assert sorted(plan.route(lead, local, random.Random(2))) == sorted(want)
    # the first candidates and the rest, as far as they are read, are one such order
    first, rest = plan.route_first(lead, local, random.Random(3))
    whole = first + (list(rest) if rest is not None else [])
    assert sorted(whole) == sorted(want)
    assert [plan.buyers[i].priority for i in whole] == [plan.buyers[i].priority for i in want]
    if method != "waterfall":
        assert whole == want
    if plan.first_candidates:
        assert first == whole[:plan.first_candidates]
        assert (rest is None) == (len(whole) <= plan.first_candidates)
    else:  # rotating: every eligible buyer at once
        assert rest is None and first == want


def test_waterfall_ties_follow_the_weights() -> None:
    """Two buyers of one priority, weights 3 and 1: the heavier is first about 3/4 of
    the time, as ordered() does it."""
    plan = Runtime(make_config(campaign(), buyer("a", weight=3), buyer("b", weight=1),
                               buyer("c", priority=2))).campaigns["camp"]
    local = datetime(2026, 1, 5, 12, tzinfo=ZoneInfo("UTC"))
    rng = random.Random(7)
    orders = [plan.route({"email": "a@b.example"}, local, rng) for _ in range(4000)]
    assert {tuple(o[2:]) for o in orders} == {(2,)}
    assert sum(o[0] == 0 for o in orders) / len(orders) == pytest.approx(0.75, abs=0.03)


def test_route_first_reads_only_what_it_needs_and_keeps_the_tie_break_fair() -> None:
    """200 buyers, the first alone at priority 1, the rest tied at priority 2 (one weight):
    a lead is routed with the first four and the rest left unread; read to the end they
    are every buyer once, and each of the tied is second about as often as any other."""
    from engine.routing.plans import EXTRA_CANDIDATES

    parts = [campaign(), buyer("b000", priority=1)]
    parts += [buyer(f"b{i:03d}", priority=2) for i in range(1, 200)]
    plan = Runtime(make_config(*parts)).campaigns["camp"]
    local = datetime(2026, 1, 5, 12, tzinfo=ZoneInfo("UTC"))
    rng = random.Random(11)
    first, rest = plan.route_first({"email": "a@b.example"}, local, rng)
    assert len(first) == 1 + EXTRA_CANDIDATES and first[0] == 0 and rest is not None
    assert sorted(first + list(rest)) == list(range(200))
    seconds = [plan.route_first({"email": "a@b.example"}, local, rng)[0][1]
               for _ in range(199 * 60)]
    counts = [seconds.count(i) for i in range(1, 200)]
    assert min(counts) > 25 and max(counts) < 100  # 60 each on average


def test_a_campaign_that_needed_more_starts_its_leads_with_more_for_a_while() -> None:
    """After a MORE the first candidates double (up to every buyer) for WIDENED_FOR
    leads, then halve back, step by step, to sell limit + EXTRA_CANDIDATES."""
    from engine.routing.plans import EXTRA_CANDIDATES, WIDENED_FOR

    plan = Runtime(make_config(campaign(), *[buyer(f"b{i:02d}", priority=i + 1)
                                             for i in range(20)])).campaigns["camp"]
    local = datetime(2026, 1, 5, 12, tzinfo=ZoneInfo("UTC"))
    base = 1 + EXTRA_CANDIDATES

    def first() -> int:
        return len(plan.route_first({"email": "a@b.example"}, local, random.Random(1))[0])

    assert first() == base
    plan.needed_more(base)
    plan.needed_more(base)  # a second MORE of the same call, routed before it widened
    assert first() == 2 * base
    plan.needed_more(2 * base)
    assert first() == 4 * base
    for _ in range(WIDENED_FOR - 1):
        first()
    assert first() == 2 * base  # the WIDENED_FOR-th lead since: halved once
    for _ in range(WIDENED_FOR - 1):
        first()
    assert first() == base and plan.first_candidates == base
    for _ in range(5):
        plan.needed_more(plan.first_candidates)
    assert plan.first_candidates == 20 and first() == 20
    for _ in range(3 * WIDENED_FOR):  # every buyer at once, and back down from there
        first()
    assert plan.first_candidates == base
