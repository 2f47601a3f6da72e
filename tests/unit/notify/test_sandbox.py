"""engine.notify.sandbox: a tenant's templates render in a child process with limits, so a
template that would loop for hours or ask for gigabytes is refused instead of holding the
engine's event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.notify import TemplateError, sandbox
from engine.notify import templates as t

D = t.default("balance_alert")


def _tpl(text: str) -> t.Templates:
    return t.Templates(D.subject, text, D.html)


async def test_a_valid_template_renders_as_in_process() -> None:
    got = await sandbox.validate("balance_alert", D)
    assert got == t.validate("balance_alert", D.subject, D.text, D.html)
    data = [t.sample("cap_reached"), t.sample("cap_reached") | {"client_name": "<b>"}]
    assert await sandbox.render("cap_reached", t.default("cap_reached"), data) == [
        t.render("cap_reached", c) for c in data]
    assert await sandbox.render("cap_reached", t.default("cap_reached"), []) == []


@pytest.mark.parametrize(("source", "part", "reason"), [
    ("{{ ''.__class__.__mro__ }}", "text", "not allowed"),
    ("{% for x in %}", "text", "syntax error"),
    ("{{ nope }}", "text", "unknown variable"),
    ("{{ 'x' * 2000000 }}", "text", "more than 1048576"),
    ("{{ 'x' * 1000000000 }}", "-", "MiB"),
    ("{{ 'x'|center(900000000) }}", "-", "MiB"),
    ('{{ "\\ud800" }}', "-", "not valid Unicode"),
])
async def test_what_fails_is_a_template_error(source: str, part: str, reason: str) -> None:
    with pytest.raises(TemplateError) as err:
        await sandbox.validate("balance_alert", _tpl(source))
    assert err.value.part == part and reason in err.value.reason, err.value


async def test_a_runaway_loop_is_stopped_and_the_loop_stays_free() -> None:
    """10^10 iterations: stopped by the child's CPU limit, while this event loop ticks."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    try:
        with pytest.raises(TemplateError) as err:
            await sandbox.validate("balance_alert", _tpl(
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                "{% endfor %}"))
    finally:
        ticker.cancel()
    took = time.monotonic() - started
    assert "stopped while rendering" in err.value.reason or "took more than" in err.value.reason
    assert took < sandbox.WALL_S + 2
    assert ticks > 10 * took  # the loop was never held


async def test_text_alone_renders_without_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """No {{, {% or {#: nothing runs, so no child is started (schemathesis' and most
    previews' strings)."""
    async def no_child(*args: object, **kw: object) -> None:
        raise AssertionError("a child was started")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_child)
    plain = t.Templates("Low balance { }", "Your balance is low. {x}", "<p>Low & { }</p>")
    got = await sandbox.validate("balance_alert", plain)
    assert got == t.Rendered("Low balance { }", "Your balance is low. {x}", "<p>Low & { }</p>")
    with pytest.raises(TemplateError):
        await sandbox.validate("balance_alert", t.Templates("", "x", "y"))  # empty subject
