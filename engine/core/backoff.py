"""Exponential backoff with full jitter: the one wait before a retry (webhooks, e-mail)."""

from __future__ import annotations

import random

_rng = random.SystemRandom()


def backoff_ms(attempt: int, base_ms: int, max_ms: int, *, rng: random.Random = _rng) -> int:
    """Full-jitter wait before retry number ``attempt`` (1-based; less counts as 1):
    uniform in ``[0, min(max_ms, base_ms * 2**(attempt-1))]``."""
    ceiling = min(max_ms, base_ms * (1 << min(max(attempt - 1, 0), 40)))
    return rng.randint(0, max(ceiling, 0))
