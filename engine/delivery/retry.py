"""Retry timing: exponential backoff with full jitter, and ``Retry-After``.

The n-th retry (n = 1, 2, ...) waits a uniformly random time in
``[0, min(retry_max_ms, retry_base_ms * 2**(n-1))]`` ("full jitter"); a ``Retry-After``
header (seconds or an HTTP-date) is a lower bound on that wait.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

from engine.core.backoff import backoff_ms
from engine.core.untrusted import ascii_int

_rng = random.SystemRandom()


def parse_retry_after(value: str | None, now_ms: int) -> int | None:
    """Milliseconds to wait from a ``Retry-After`` header, or None when absent or invalid."""
    if not value:
        return None
    text = value.strip()
    seconds = ascii_int(text, max_digits=12)  # str.isdigit() took "²", which int() refused
    if seconds is not None:
        return seconds * 1_000
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, int(when.timestamp() * 1_000) - now_ms)


def retry_delay_ms(
    attempt: int, base_ms: int, max_ms: int, retry_after_ms: int | None,
    *, rng: random.Random = _rng,
) -> int:
    """The wait before retry ``attempt``: jittered backoff, at least ``Retry-After``."""
    delay = backoff_ms(attempt, base_ms, max_ms, rng=rng)
    if retry_after_ms is not None:
        delay = max(delay, retry_after_ms)
    return delay
