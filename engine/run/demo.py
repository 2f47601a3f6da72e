"""``leadflow demo``: the whole engine on the embedded Redis, driven over real HTTP.

Posts generated leads (mostly valid, some invalid, some duplicates and replays) to
``POST /v1/leads``, shows a progress bar, prints what happened and the money that moved,
then runs the reconcile check; a failed reconcile makes the command exit non-zero.
``--leads`` is at least 1: anything less is refused before the engine starts.

With the buyer sink (the default; ``--no-sink`` turns it off) every buyer's webhook points
at a local aiohttp server on a loopback port, signed with a throwaway secret, and the
in-process delivery worker really delivers the sold leads: the sink accepts most and
rejects about one in ten (decided by the webhook-id, so a retry gets the same answer),
and those sales are refunded before the balances and the reconcile are read.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import zlib
from collections import Counter
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from tqdm import tqdm

from engine.core import keys, money
from engine.core.config import Config, Delivery, ResponseRule, resolve_secret
from engine.core.errors import LeadflowError
from engine.notify.templates import Rendered
from engine.notify.worker import GROUP as NOTIFY_GROUP
from engine.notify.worker import run_notify_worker
from engine.run.reconcile import reconcile
from engine.run.service import Service
from engine.run.workers import WorkerContext, WorkerFn, delivery_worker

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
    out = {}
    for t in svc.cfg.tenants:
        for account in await svc.store.account_ids(t.id):
            state = await svc.store.account(t.id, account)
            if state is not None:
                out[(t.id, account)] = state.balance
    return out


async def _events(svc: Service) -> Counter[str]:
    counts: Counter[str] = Counter()
    for t in svc.cfg.tenants:
        for _, fields in await svc.store.stream_range(keys.events(t.id)):
            counts[fields["type"]] += 1
        counts["delivery"] += await svc.store.redis.xlen(keys.deliveries(t.id))
    return counts


class BuyerSink:
    """A local webhook endpoint for every buyer of the demo (loopback only)."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.url = ""
        self.secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        msg_id = request.headers.get("webhook-id", "")
        if zlib.crc32(msg_id.encode()) % 10 == 0:  # about one in ten, stable per delivery
            self.outcomes["rejected"] += 1
            return web.json_response({"status": "rejected", "reason": "demo: not in area"})
        self.outcomes["accepted"] += 1
        return web.json_response({"status": "accepted"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{buyer}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def route(self, cfg: Config) -> Config:
        """The config with every buyer's webhook pointing at this sink."""
        rules = [ResponseRule(path="status", equals="accepted")]
        buyers = [
            msgspec.structs.replace(b, delivery=Delivery(
                url=f"{self.url}/{b.id}", secret=self.secret, accept=rules, timeout_ms=2_000,
                retry_base_ms=50, retry_max_ms=500))
            for b in cfg.buyers
        ]
        return msgspec.structs.replace(cfg, buyers=buyers)


class MailSink:
    """The demo's e-mail: what the notify worker sends, kept in memory (no SMTP server);
    a :class:`engine.notify.transport.Transport` for every tenant."""

    channel = "demo"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []  # (recipient, subject)

    async def send(self, recipient: str, message: Rendered, *, key: str) -> None:
        self.sent.append((recipient, message.subject))

    async def close(self) -> None:
        """Nothing to close: the messages stay for the summary."""

    def worker(self) -> WorkerFn:
        """The notify worker sending into this sink (and the weekly reports, none of which
        is due in a demo's minute but for a tenant whose report hour it is)."""
        async def demo_notify(ctx: WorkerContext, stop: asyncio.Event) -> None:
            cfg = ctx.config()
            await run_notify_worker(cfg, ctx.store, consumer=ctx.consumer + "-notify",
                                    stop=stop, transports={t.id: self for t in cfg.tenants})
        return demo_notify


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _group_at(svc: Service, group: str, *, end: bool, within_s: float = 30.0) -> bool:
    """Wait until ``group`` exists on every tenant's events stream (``end``: and has read
    and acked every entry)."""
    deadline = time.monotonic() + within_s
    while True:
        ready = 0
        for t in svc.cfg.tenants:
            stream = keys.events(t.id)
            rows: Any = await svc.store.redis.xrevrange(stream, count=1)
            last = _text(rows[0][0]) if rows else None
            groups = await svc.store.redis.xinfo_groups(stream) \
                if await svc.store.redis.exists(stream) else []
            for g in groups:
                if _text(g["name"]) == group and (not end or (
                        g["pending"] == 0 and last in (None, _text(g["last-delivered-id"])))):
                    ready += 1
        if ready == len(svc.cfg.tenants):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


async def _delivered(svc: Service, *, within_s: float = 60.0) -> bool:
    """Wait until no delivery job is left on a stream or waiting for a retry."""
    deadline = time.monotonic() + within_s
    while True:
        left = 0
        for t in svc.cfg.tenants:
            left += await svc.store.redis.xlen(keys.deliveries(t.id))
            left += await svc.store.redis.zcard(keys.retries(t.id))
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


DEMO_EMAIL = "buyer@demo.example"
DEMO_OPERATOR = "operator@demo.example"  # the tenant's operator page, same password
DEMO_PASSWORD = "leadflow demo buyer"  # the demo's only: a throwaway state dir, loopback


async def _demo_login(svc: Service) -> None:
    """A portal user mapped to the first client account and an operator of its tenant,
    their password the demo's known one (only here: never in a real config), and how to
    log in."""
    ids = svc.app.identity
    clients = svc.cfg.clients
    if ids is None or not clients:
        return
    c = clients[0]
    _, invite = await ids.create_user(c.tenant, DEMO_EMAIL, [c.id], invite_ttl_ms=3_600_000)
    await ids.accept_invite(invite.token, DEMO_PASSWORD)
    _, invite = await ids.create_user(c.tenant, DEMO_OPERATOR, [], invite_ttl_ms=3_600_000,
                                      role="operator")
    await ids.accept_invite(invite.token, DEMO_PASSWORD)
    print(f"buyer portal: {svc.url}/portal/login?t={c.tenant}  (account {c.id})\n"
          f"  e-mail {DEMO_EMAIL}  password {DEMO_PASSWORD!r}\n"
          f"  the operator page: e-mail {DEMO_OPERATOR}, the same password")


async def _until_interrupted(svc: Service) -> None:
    """``--hold``: keep serving (the portal) until Ctrl-C or SIGTERM."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    print(f"\nserving {svc.url} (the portal: {svc.url}/portal) until Ctrl-C", flush=True)
    try:
        await done.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_demo(
    cfg: Config, *, leads: int, seed: int | None, redis_url: str | None, sink: bool = True,
    hold: bool = False,
) -> int:
    if leads < 1:  # nothing to show: 0 used to exit 1 after "0 problems", -5 exited 0
        raise LeadflowError(f"--leads must be at least 1 (got {leads})")
    seed = seed if seed is not None else random.SystemRandom().randrange(1, 2**31)
    state_dir = tempfile.mkdtemp(prefix="leadflow-demo-")
    buyers = BuyerSink() if sink else None
    workers: list[WorkerFn] = []
    if buyers is not None:
        await buyers.start()
        cfg = buyers.route(cfg)
        workers.append(delivery_worker)
    mail = MailSink()
    workers.append(mail.worker())
    svc = Service(cfg, redis_url=redis_url, port=0, state_dir=state_dir, workers=workers)
    print(f"leadflow demo: {leads} leads, seed {seed}, state in {state_dir}")
    drained = True
    try:
        await svc.start()
        if redis_url is None:
            print(f"embedded redis-server on port {svc.embedded.port if svc.embedded else '?'}")
        if buyers is not None:
            print(f"buyer webhooks: local sink at {buyers.url}")
        await _demo_login(svc)
        await _group_at(svc, NOTIFY_GROUP, end=False)  # it starts at the stream's end
        before = await _balances(svc)
        counts = await _post_all(svc.url, cfg, make_leads(random.Random(seed), leads))
        if buyers is not None:
            drained = await _delivered(svc)
        mailed = await _group_at(svc, NOTIFY_GROUP, end=True)
        after = await _balances(svc)
        events = await _events(svc)
        if buyers is not None:
            events.pop("delivery", None)  # delivered jobs leave the stream
        checks, findings = await reconcile(cfg, svc.store)
        if hold:
            _print_summary(counts, before, after, events)
            await _until_interrupted(svc)
    finally:
        await svc.stop()
        if buyers is not None:
            await buyers.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    if not hold:  # printed before serving on
        _print_summary(counts, before, after, events)
    if buyers is not None:
        _print_deliveries(buyers, drained)
    _print_mail(mail, mailed)
    for f in findings:
        print(f"RECONCILE FAIL {f.tenant}/{f.account}: {f.problem}")
    print(f"reconcile: {len(checks)} accounts, {len(findings)} problems")
    return 1 if findings or counts.get("ERROR", 0) == leads else 0


def _print_deliveries(buyers: BuyerSink, drained: bool) -> None:
    print("\ndeliveries (local buyer sink):")
    for outcome, n in sorted(buyers.outcomes.items()):
        print(f"  {outcome:<20} {n:>8}")
    if not drained:
        print("  (some deliveries were still pending when the demo stopped)")


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


def _print_mail(mail: MailSink, done: bool) -> None:
    print(f"\ne-mail the notify worker sent (in memory; {len(mail.sent)} messages):")
    by_subject = Counter(mail.sent)
    for (recipient, subject), n in sorted(by_subject.items()):
        print(f"  {recipient:<28} {n:>3} x {subject}")
    if not done:
        print("  (some events were still being mailed when the demo stopped)")
