"""The notification counters (engine.obs.metrics) move as the notify worker sends, fails and
dead-letters, through the observer engine.run hands it (telemetry.notify_observer): a real
aiosmtpd server and the tests' redis-server, the process-wide registry read before and after."""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry

from engine.core import keys
from engine.notify.templates import KINDS
from engine.notify.transport import CHANNELS
from engine.notify.worker import NotifyWorker, smtp_transport
from engine.obs import telemetry
from engine.obs.metrics import Metrics
from engine.run import configfile
from engine.store.store import Store
from tests.helpers.smtp import SmtpServer

OUTCOMES = ("sent", "failed", "dead_lettered")

TOML = """
[[tenants]]
id = "t1"
api_token = "tok-t1"
[tenants.notify.smtp]
host = "127.0.0.1"
port = {port}
security = "plain"
sender = "billing@acme.example"
timeout_s = 5

[[clients]]
tenant = "t1"
id = "c1"
contacts = {contacts}
"""


def _counts() -> dict[str, float]:
    return {o: REGISTRY.get_sample_value(f"leadflow_notify_{o}_total",
                                         {"channel": "smtp", "kind": "balance_alert"}) or 0.0
            for o in OUTCOMES}


def _worker(redis: aioredis.Redis, server: SmtpServer, *contacts: str,
            max_deliveries: int = 20) -> NotifyWorker:
    listed = "[" + ", ".join(f'"{c}"' for c in contacts) + "]"
    cfg = configfile.loads(TOML.format(port=server.port, contacts=listed), source="<test>")
    transport = smtp_transport(cfg.tenant("t1"))
    assert transport is not None
    return NotifyWorker(cfg, Store(redis), {"t1": transport}, consumer="w1", block_ms=None,
                        claim_idle_ms=0, max_deliveries=max_deliveries,
                        observer=telemetry.notify_observer)


async def _alert(redis: aioredis.Redis, worker: NotifyWorker) -> bool:
    """One balance alert, read and handled once: whether the entry is done."""
    await worker.start_group()
    await redis.xadd(keys.events("t1"), {b"type": b"balance_alert", b"account": b"c1",
                                         b"balance": b"1", b"threshold": b"20000000"})
    [batch] = await worker.events.poll(10)
    [(entry_id, fields)] = batch.entries
    return await worker.handle("t1", entry_id, fields)


def _moved(before: dict[str, float]) -> dict[str, float]:
    after = _counts()
    return {o: after[o] - before[o] for o in OUTCOMES}


async def test_sent_counts_each_recipient(redis: aioredis.Redis,
                                          smtp_server: SmtpServer) -> None:
    before = _counts()
    assert await _alert(redis, _worker(redis, smtp_server, "a@x.example", "b@x.example"))
    assert len(smtp_server.received) == 2
    assert _moved(before) == {"sent": 2, "failed": 0, "dead_lettered": 0}


async def test_a_failure_tried_again_is_failed(redis: aioredis.Redis,
                                               smtp_server: SmtpServer) -> None:
    smtp_server.stop()
    before = _counts()
    assert not await _alert(redis, _worker(redis, smtp_server, "a@x.example"))
    assert _moved(before) == {"sent": 0, "failed": 1, "dead_lettered": 0}


async def test_a_refusal_for_good_and_a_last_delivery_are_dead_lettered(
        redis: aioredis.Redis, smtp_server: SmtpServer) -> None:
    before = _counts()
    # 550 to RCPT: dead at once; the other recipient is sent
    assert await _alert(redis, _worker(redis, smtp_server, "refused@x.example", "a@x.example"))
    assert _moved(before) == {"sent": 1, "failed": 0, "dead_lettered": 1}
    await redis.flushdb()
    smtp_server.stop()
    before = _counts()
    # the server down on the entry's last delivery: given up, not "failed"
    assert await _alert(redis, _worker(redis, smtp_server, "a@x.example", max_deliveries=1))
    assert _moved(before) == {"sent": 0, "failed": 0, "dead_lettered": 1}
    assert len(await redis.xrange(keys.dead_letter("t1", "events"))) == 1


def test_every_channel_and_kind_is_exported_at_zero() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    for outcome in OUTCOMES:
        for channel in CHANNELS:
            for kind in KINDS:
                labels = {"channel": channel, "kind": kind}
                assert registry.get_sample_value(f"leadflow_notify_{outcome}_total",
                                                 labels) == 0.0, (outcome, labels)
