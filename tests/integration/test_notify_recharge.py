"""A recharge attempt, from the balance crossing its threshold to the client's e-mail: the
real recharge worker charging through the real ``stripe`` SDK against localstripe, the
events it emits read by the notify worker, sent to a real aiosmtpd server (the wallet
seed: "notified via email each time ... a balance refresh is attempted")."""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis

from billing import recharge
from billing.stripe_gateway import StripeGateway
from engine.core.config import AutoRecharge, Config, Notify, Smtp
from engine.notify.worker import NotifyWorker, smtp_transport
from tests.helpers.billing_fixtures import T, new_ctx
from tests.helpers.billing_fixtures import make_config as billing_config
from tests.helpers.smtp import SmtpServer
from tests.helpers.stripe_fixture import DECLINES, LocalStripe

M = 1_000_000
CONTACT = "ap@bright.example"


def _config(server: SmtpServer) -> Config:
    cfg = billing_config(auto=AutoRecharge(enabled=True, threshold="20.00", amount="100.00"))
    tenant = msgspec.structs.replace(cfg.tenants[0], name="Acme Leads", notify=Notify(
        smtp=Smtp(host=server.host, port=server.port, security="plain",
                  sender="Acme Leads <billing@acme.example>", timeout_s=5)))
    clients = [msgspec.structs.replace(c, name="Bright Solar", contacts=[CONTACT])
               if c.id == "c1" else c for c in cfg.clients]
    return msgspec.structs.replace(cfg, tenants=[tenant], clients=clients)


async def _recharge_and_mail(redis: aioredis.Redis, gateway: StripeGateway,
                             localstripe: LocalStripe, server: SmtpServer,
                             card: str) -> list[str]:
    """Fund c1 to 30.00, spend 20.00 (under the 20.00 threshold), run the recharge worker
    once, then the notify worker: the text bodies of the e-mails to the contact."""
    cfg = _config(server)
    ctx = await new_ctx(redis, gateway, cfg)
    await ctx.methods.attach(T, "c1", localstripe.card(card))
    transport = smtp_transport(cfg.tenant(T))
    assert transport is not None
    notify = NotifyWorker(cfg, ctx.store, {T: transport}, consumer="n1", block_ms=None)
    await notify.start_group()
    assert (await ctx.store.adjust(T, "c1", 30 * M, "adjustment")).ok
    assert (await ctx.store.adjust(T, "c1", -20 * M, "usage")).ok  # 10.00: under 20.00
    assert await recharge.process_once(cfg, ctx.store, gateway, consumer="r1", ctx=ctx) >= 1
    for batch in await notify.events.poll(50):
        for entry_id, fields in batch.entries:
            assert await notify.handle(batch.tenant, entry_id, fields)
    got = [r for r in server.received if r.recipients == [CONTACT]]
    return [f"{r.message['Subject']}\n"
            + r.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            for r in got]


async def test_a_recharge_that_succeeds_is_mailed_with_its_amount_and_fee(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe,
        smtp_server: SmtpServer) -> None:
    mails = await _recharge_and_mail(redis, gateway, localstripe, smtp_server, "4242424242424242")
    # the balance alert (10.00 under 20.00) and the recharge
    subjects = sorted(m.split("\n", 1)[0] for m in mails)
    assert len(mails) == 2, mails
    recharged = next(m for m in mails if "We charged" in m)
    # the card paid 103.00: 100.00 to the balance and the 3 % card fee
    assert "We charged 103.00 USD for Bright Solar (account c1): 100.00 USD added to the " \
        "balance and a card fee of 3.00 USD." in " ".join(recharged.split())
    assert "New balance: 110.00 USD." in recharged
    assert "Your balance is under 20.00 USD" in subjects


async def test_a_declined_recharge_is_mailed_as_declined(
        redis: aioredis.Redis, gateway: StripeGateway, localstripe: LocalStripe,
        smtp_server: SmtpServer) -> None:
    mails = await _recharge_and_mail(redis, gateway, localstripe, smtp_server, DECLINES)
    declined = [m for m in mails if m.startswith("Recharge of")]
    assert len(declined) == 1, mails
    assert declined[0].startswith("Recharge of 103.00 USD declined") or \
        declined[0].startswith("Recharge of 100.00 USD declined"), declined
    assert "10.00 USD" in declined[0]  # the balance, unchanged
