"""What each recipient of a message gets, as the tenant set it up (issue #19).

:func:`compose` is the notify worker's one call between an event's message and its sends:

- a recipient who turned the message's category off (:mod:`engine.notify.prefs`) gets
  nothing (the worker counts that recipient as done);
- a message of an optional category carries the recipient's own unsubscribe link
  (``unsubscribe_url`` in its context; the transport adds ``List-Unsubscribe``), when the
  engine has a public URL (``[settings] public_url``);
- the tenant's override of the kind (:mod:`engine.notify.overrides`) is rendered in a child
  process (:mod:`engine.notify.sandbox`); one that fails there (it rendered against the
  sample data when stored, not necessarily against this message's) is logged by kind
  only, never its content or the message's data, and the default is sent instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from engine.notify import NotifyError, TemplateError, overrides, prefs, sandbox
from engine.notify.templates import Rendered, render

log = logging.getLogger("leadflow.notify")


async def contexts(redis: aioredis.Redis, tenant: str, kind: str, context: Mapping[str, Any],
                   recipients: Sequence[str], *, public_url: str | None
                   ) -> list[dict[str, Any]]:
    """``context`` for each recipient: with its unsubscribe link when ``kind``'s category is
    optional and there is a public URL, else without one (a sample's is dropped)."""
    cat = prefs.category(kind)
    base = {k: v for k, v in context.items() if k != "unsubscribe_url"}
    if cat is None or cat not in prefs.OPTIONAL or not public_url:
        return [dict(base) for _ in recipients]
    key = await prefs.secret(redis, tenant, create=True)
    assert key is not None  # made above
    return [{**base, "unsubscribe_url": prefs.unsubscribe_url(
                public_url, prefs.token(key, tenant, r, cat))}
            for r in recipients]


async def render_for(redis: aioredis.Redis, tenant: str, kind: str,
                     data: Sequence[Mapping[str, Any]]) -> list[Rendered]:
    """``kind`` rendered with each of ``data``: the tenant's override when it has one (in a
    child; the default when that fails), else the default. NotifyError when the default
    fails."""
    override = await overrides.get(redis, tenant, kind)
    if override is not None:
        try:
            return await sandbox.render(kind, override, data)
        except NotifyError as exc:
            part = exc.part if isinstance(exc, TemplateError) else "-"
            log.warning("notify: the override of %s of %s failed to render (%s); the default "
                        "is sent", kind, tenant, part)
    return [render(kind, c) for c in data]


async def compose(redis: aioredis.Redis, tenant: str, kind: str, context: Mapping[str, Any],
                  recipients: Sequence[str], *, public_url: str | None
                  ) -> dict[str, Rendered]:
    """The rendered message of each recipient who wants ``kind``; a recipient left out has
    turned its category off. Raises NotifyError when even the default fails to render."""
    wanted = [r for r in dict.fromkeys(recipients)
              if await prefs.wanted(redis, tenant, r, kind)]
    if not wanted:
        return {}
    data = await contexts(redis, tenant, kind, context, wanted, public_url=public_url)
    return dict(zip(wanted, await render_for(redis, tenant, kind, data), strict=True))
