"""The one e-mail address rule: a lead's ``email`` field (engine.routing.fields) and a portal
user's login (engine.identity) are checked by the same pattern.

Pragmatic: one ``@``, a dot-atom local part of at most 64 characters, LDH domain labels
with a dot and an alphabetic TLD, at most 254 characters in all, lower-cased. Quoted
local parts, IP literals and raw IDNs are refused.
"""

from __future__ import annotations

import re

_ATEXT = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, lower-cased
EMAIL_LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*", re.ASCII)
EMAIL_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}", re.ASCII)
# the two at once, one match per address: neither part may contain an "@", so the local
# part is what comes before the first one
EMAIL = re.compile(rf"({EMAIL_LOCAL.pattern})@{EMAIL_DOMAIN.pattern}", re.ASCII)
MAX_EMAIL = 254


def normalize_email(text: str) -> str | None:
    """The address lower-cased, or None when it is not one."""
    value = text.lower()
    found = EMAIL.fullmatch(value)
    if found is None or len(value) > MAX_EMAIL or found.end(1) > 64:
        return None
    return value
