"""``leadflow demo``: the whole engine on the embedded Redis, driven over real HTTP.

Posts generated leads (mostly valid, some invalid, some duplicates and replays) to
``POST /v1/leads``, shows a progress bar, prints what happened and the money that moved,
then runs the reconcile check; a failed reconcile makes the command exit non-zero.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import tempfile
from collections import Counter
from typing import Any

import aiohttp
from tqdm import tqdm

from billing import money
from engine import keys
from engine.config import Config, resolve_secret
from engine.reconcile import reconcile
from engine.service import Service

_FIRST = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jo"]
_LAST = ["Ng", "Okafor", "Smith", "Garcia", "Kim", "Rossi", "Haddad", "Weber"]
_STATES = ["CA", "AZ", "NV", "TX", "FL", "NY", "IL", "WA", "AK", "OR"]


def _person(rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "first_name": rng.choice(_FIRST),
        "last_name": rng.choice(_LAST),
        "email": f"lead{n}.{rng.randrange(10**9)}@example.com",
        "phone": f"({rng.randrange(201, 989)}) {rng.randrange(200, 999)}-"
        f"{rng.randrange(10**4):04d}",
        "state": rng.choice(_STATES),
        "zip": f"{rng.randrange(10000, 99999)}",
    }


def make_lead(rng: random.Random, n: int) -> dict[str, Any]:
    """One generated lead body (without ``lp_key``) for config/example.toml; ``n`` makes the
    email unique. Mostly valid; ~8 % have a broken field, ~3 % come from the test supplier."""
    p = _person(rng, n)
    campaign = rng.choices(["solar", "auto-insurance", "solar-rr"], [5, 4, 1])[0]
    supplier = "aff-202" if campaign == "auto-insurance" and rng.random() < 0.5 else "aff-101"
    if rng.random() < 0.03:
        supplier = "aff-test"
    body: dict[str, Any] = {"lp_campaign_id": campaign, "lp_supplier_id": supplier, **p}
    if campaign == "solar":
        body |= {
            "monthly_bill": rng.randrange(40, 600),
            "homeowner": rng.random() < 0.8,
            "roof_type": rng.choice(["asphalt", "metal", "tile"]),
        }
    elif campaign == "auto-insurance":
        body |= {
            "dob": f"19{rng.randrange(50, 99)}-0{rng.randrange(1, 9)}-1{rng.randrange(0, 9)}",
            "vehicles": rng.randrange(1, 4),
            "insured": rng.random() < 0.7,
        }
    if rng.random() < 0.08:  # invalid: a broken field
        body[rng.choice(["email", "phone", "zip"])] = "not-valid"
    return body


def make_leads(rng: random.Random, n: int, *, start: int = 0) -> list[dict[str, Any]]:
    """``n`` leads numbered from ``start``; ~7 % repeat an earlier person (duplicates)."""
    leads: list[dict[str, Any]] = []
    for i in range(start, start + n):
        if leads and rng.random() < 0.07:  # the same person again: a duplicate
            again = dict(rng.choice(leads))
            again["first_name"] = rng.choice(_FIRST)
            leads.append(again)
        else:
            leads.append(make_lead(rng, i))
    return leads


async def _post_all(url: str, cfg: Config, leads: list[dict[str, Any]]) -> Counter[str]:
    keys_by_supplier = {s.id: resolve_secret(s.key) for s in cfg.suppliers}
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(32)
    bar = tqdm(total=len(leads), desc="posting leads", unit="lead", file=sys.stderr, disable=None)
    async with aiohttp.ClientSession() as http:

        async def post(lead: dict[str, Any]) -> None:
            body = {**lead, "lp_key": keys_by_supplier[lead["lp_supplier_id"]]}
            async with sem, http.post(url + "/v1/leads", json=body) as r:
                data = await r.json()
                counts[data["status"] + (" (test)" if data.get("test") else "")] += 1
            bar.update()

        await asyncio.gather(*(post(lead) for lead in leads))
    bar.close()
    return counts


async def _balances(svc: Service) -> dict[tuple[str, str], int]:
    assert svc.store is not None
    out = {}
    for t in svc.cfg.tenants:
        for account in await svc.store.account_ids(t.id):
            state = await svc.store.account(t.id, account)
            if state is not None:
                out[(t.id, account)] = state.balance
    return out


async def _events(svc: Service) -> Counter[str]:
    assert svc.store is not None
    counts: Counter[str] = Counter()
    for t in svc.cfg.tenants:
        for _, fields in await svc.store.stream_range(keys.events(t.id)):
            counts[fields["type"]] += 1
        counts["delivery"] += await svc.store.redis.xlen(keys.deliveries(t.id))
    return counts


async def run_demo(cfg: Config, *, leads: int, seed: int | None, redis_url: str | None) -> int:
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 2**31)
    state_dir = tempfile.mkdtemp(prefix="leadflow-demo-")
    svc = Service(cfg, redis_url=redis_url, port=0, state_dir=state_dir)
    print(f"leadflow demo: {leads} leads, seed {seed}, state in {state_dir}")
    try:
        await svc.start()
        if redis_url is None:
            print(f"embedded redis-server on port {svc.embedded.port if svc.embedded else '?'}")
        before = await _balances(svc)
        counts = await _post_all(svc.url, cfg, make_leads(random.Random(seed), leads))
        after = await _balances(svc)
        events = await _events(svc)
        assert svc.store is not None
        checks, findings = await reconcile(cfg, svc.store)
    finally:
        await svc.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    _print_summary(counts, before, after, events)
    for f in findings:
        print(f"RECONCILE FAIL {f.tenant}/{f.account}: {f.problem}")
    print(f"reconcile: {len(checks)} accounts, {len(findings)} problems")
    return 1 if findings or counts.get("ERROR", 0) == leads else 0


def _print_summary(
    counts: Counter[str],
    before: dict[tuple[str, str], int],
    after: dict[tuple[str, str], int],
    events: Counter[str],
) -> None:
    print("\nleads by status:")
    for status, n in sorted(counts.items()):
        print(f"  {status:<20} {n:>8}")
    print("\nmoney moved per account:")
    for key in sorted(after):
        delta = after[key] - before.get(key, 0)
        print(
            f"  {key[0]}/{key[1]:<24} {money.format(delta):>12}   "
            f"balance {money.format(after[key]):>12}"
        )
    print("\nevents emitted:")
    for etype, n in sorted(events.items()):
        print(f"  {etype:<20} {n:>8}")
