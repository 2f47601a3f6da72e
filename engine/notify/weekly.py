"""The weekly report e-mail (issue #19; the payment-methods seed's "weekly report email").

Each tenant's reports are due at ``[tenants.notify.weekly_report]`` ``day`` and ``at``
(default Monday 09:00) in the tenant's time zone, and cover the seven local days before
that day (Monday 00:00 to Monday 00:00 for the default). Every client account with
``contacts`` gets its own report, and the tenant's ``operators`` get the wallet's:
leads bought, spent, funded, returns, refunds and the balance
(:func:`billing.archive.period_totals`: the SQL archive plus the ledger stream's entries
not archived yet, so the numbers are whole however far the ledger worker lags).

Exactly once per week and recipient, across restarts and any number of workers: each
report goes through the tenant's :class:`engine.notify.outbox.Outbox` as the event
``weekly:<first day>:<account>``. A failed send is tried again on a later pass once its
backoff is over, and given up after :data:`MAX_ATTEMPTS` failures. When every report of a
week is sent or given up, ``keys.weekly(tenant, first day)`` is set, so later passes of
that week read nothing else.

A report is sent only within :data:`LATE_MS` of its due time: a worker down for longer (or
a tenant that turns the report on mid-week) waits for the next week rather than mailing
an old week days late.

The clock is injected (``clock_ms``): :meth:`WeeklyReports.run_due` does one pass at the
clock's time, and :meth:`WeeklyReports.run` is the loop of passes a worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as day_time
from typing import Any, Final
from zoneinfo import ZoneInfo

from billing.archive import Archive, period_totals
from engine.core import keys
from engine.core.config import WEEKDAYS, Config, Tenant
from engine.core.constants import WALLET
from engine.notify.compose import compose
from engine.notify.outbox import Outbox, SendOutcome
from engine.notify.recipients import PortalAddresses, audience, portal_addresses
from engine.store.store import UNAVAILABLE, Store

log = logging.getLogger("leadflow.notify.weekly")

KIND: Final = "weekly_report"
LATE_MS: Final = 3 * 86_400_000  # a report not sent within 3 days of its due time is skipped
MAX_ATTEMPTS: Final = 20  # failed sends of one report before it is given up
DONE_TTL_S: Final = 14 * 86_400  # how long a week's "all sent" mark is kept
PASS_EVERY_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Week:
    """The week a report covers: local days ``start`` to ``end`` (inclusive), the epoch
    milliseconds ``from_ms <= ts < to_ms`` of those days, and when its report is due."""

    start: date
    end: date
    from_ms: int
    to_ms: int
    due_ms: int


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def last_due(now_ms: int, tz: ZoneInfo, day: str, at: str) -> Week:
    """The week whose report is due last at or before ``now_ms`` (``day`` at ``at``, local
    time in ``tz``). Local times are combined with the zone's rules on each date, so a
    week across a daylight-saving change is 167 or 169 hours long, as its days are."""
    hh, mm = int(at[:2]), int(at[3:])
    local = datetime.fromtimestamp(now_ms / 1000, tz)
    d = local.date() - timedelta(days=(local.weekday() - WEEKDAYS.index(day)) % 7)
    due = _ms(datetime.combine(d, day_time(hh, mm), tz))
    if due > now_ms:  # today is the day, but not the hour yet: the week before
        d -= timedelta(days=7)
        due = _ms(datetime.combine(d, day_time(hh, mm), tz))
    start = d - timedelta(days=7)
    return Week(start=start, end=d - timedelta(days=1),
                from_ms=_ms(datetime.combine(start, day_time(0), tz)),
                to_ms=_ms(datetime.combine(d, day_time(0), tz)), due_ms=due)


def event_id(week: Week, account: str) -> str:
    """The outbox event of an account's report of ``week``."""
    return f"weekly:{week.start.isoformat()}:{account}"


class WeeklyReports:
    """The weekly reports of the tenants that have an outbox (a transport)."""

    def __init__(self, cfg: Config, store: Store, archive: Archive,
                 outboxes: Mapping[str, Outbox], *,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 observer: Callable[[str, str, str], None] | None = None,
                 portal: PortalAddresses | None = None) -> None:
        self.cfg, self.store, self.archive = cfg, store, archive
        self.portal = portal  # a client's portal users: recipients beside its contacts
        self.outboxes = outboxes
        self.clock_ms = clock_ms
        self.observer = observer  # (outcome, channel, kind): the notify worker's metrics

    def _observe(self, outcome: str, outbox: Outbox) -> None:
        if self.observer is not None:
            self.observer(outcome, outbox.transport.channel, KIND)

    async def run_due(self, tenant_id: str) -> int:
        """One pass for a tenant at the clock's time: send the reports of the week due last
        that are not sent yet; returns how many were sent now."""
        tenant = self.cfg.tenant(tenant_id)
        rule = tenant.notify.weekly_report
        outbox = self.outboxes.get(tenant_id)
        if not rule.enabled or outbox is None:
            return 0
        now = self.clock_ms()
        week = last_due(now, ZoneInfo(tenant.timezone), rule.day, rule.at)
        if now - week.due_ms > LATE_MS:
            return 0
        done_key = keys.weekly(tenant_id, week.start.isoformat())
        if await self.store.redis.exists(done_key):
            return 0
        sent, pending = 0, False
        for account in self._accounts(tenant):
            n, left = await self._account(tenant, outbox, week, account, now)
            sent += n
            pending = pending or left
        if not pending:
            await self.store.redis.set(done_key, "1", ex=DONE_TTL_S)
        return sent

    def _accounts(self, tenant: Tenant) -> list[str]:
        return [WALLET, *(c.id for c in self.cfg.clients if c.tenant == tenant.id)]

    async def _account(self, tenant: Tenant, outbox: Outbox, week: Week, account: str,
                       now: int) -> tuple[int, bool]:
        """(reports sent now, whether any is left for a later pass) of one account."""
        who = audience(self.cfg, tenant.id, account,
                       await portal_addresses(self.portal, self.cfg, tenant.id, account))
        if who is None or not who.recipients:
            return 0, False
        event = event_id(week, account)
        due: list[str] = []
        pending = False
        for recipient in who.recipients:
            attempts, retry_at = await outbox.tries(event, recipient, KIND)
            if attempts >= MAX_ATTEMPTS:
                continue  # given up (logged when it was)
            if retry_at is not None and now < retry_at:
                pending = True
                continue
            due.append(recipient)
        if not due:
            return 0, pending
        totals = await period_totals(self.store, self.archive, tenant.id, account,
                                     from_ms=week.from_ms, to_ms=week.to_ms)
        context: dict[str, Any] = {
            "tenant_name": tenant.name or tenant.id, "client_name": who.name,
            "account_id": account, "currency": "USD",
            "week_start": week.start.isoformat(), "week_end": week.end.isoformat(),
            "leads": totals.leads, "spent": totals.spent, "funded": totals.funded,
            "returns": totals.returns, "returned": totals.returned,
            "refunded": totals.refunded, "balance": totals.balance}
        # the tenant's own template, each recipient's preference and unsubscribe link
        mails = await compose(self.store.redis, tenant.id, KIND, context, due,
                              public_url=self.cfg.settings.public_url)
        sent = 0
        for recipient, message in mails.items():  # the others turned reports off
            result = await outbox.send(event, recipient, KIND, message)
            if result.outcome is SendOutcome.SENT:
                sent += 1
                self._observe("sent", outbox)
            elif result.outcome is SendOutcome.IN_FLIGHT:
                pending = True  # another worker sends it
            elif result.outcome is SendOutcome.DEAD:  # refused for good (no such mailbox)
                self._observe("dead_lettered", outbox)
                log.error("weekly report %s of %s refused for good: %s", event, tenant.id,
                          result.error)
            elif result.outcome is SendOutcome.FAILED:
                if result.attempts >= MAX_ATTEMPTS:
                    self._observe("dead_lettered", outbox)
                    log.error("weekly report %s of %s given up after %d attempts: %s",
                              event, tenant.id, result.attempts, result.error)
                else:
                    self._observe("failed", outbox)
                    pending = True
        return sent, pending

    async def run(self, stop: asyncio.Event, *, every_s: float = PASS_EVERY_S) -> None:
        """A pass over every tenant each ``every_s`` until ``stop`` is set; a tenant whose
        pass fails (Redis or SQL down) is logged and tried again on the next pass."""
        while not stop.is_set():
            for tenant_id in self.outboxes:
                try:
                    await self.run_due(tenant_id)
                except Exception as exc:  # logged; the next pass retries
                    if isinstance(exc, UNAVAILABLE):
                        log.warning("weekly reports of %s: %s; retrying", tenant_id,
                                    type(exc).__name__)
                    else:
                        log.error("weekly reports of %s failed", tenant_id, exc_info=exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


__all__ = ["KIND", "LATE_MS", "MAX_ATTEMPTS", "Week", "WeeklyReports", "event_id",
           "last_due"]
