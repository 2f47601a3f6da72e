r"""Regular expressions from the config, compiled with RE2 (linear time).

Buyer filters match them against seller input and response rules against buyer responses:
with Python's backtracking ``re``, a pattern such as ``^([a-z]+\s?)+$`` and a crafted value
of 40 characters stall the event loop for minutes. RE2 has no backreferences and no
lookarounds; a pattern that needs them is refused when the config loads.
"""

from __future__ import annotations

from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is a config error, not a line on stderr


class RegexError(ValueError):
    """The pattern is not valid RE2 syntax."""


def compile_re2(pattern: str) -> Any:
    """The compiled pattern (``.search(text)``, ``.pattern``); RegexError when invalid."""
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise RegexError(f"invalid regex (RE2 syntax): {text}") from exc
