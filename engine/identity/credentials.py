"""Buyer API keys, invite tokens and passwords: how each is made, checked and stored.

- An **API key** is ``lfk_<id>_<secret>``: ``id`` 16 lower-case hex digits (the key's public
  id, in URLs and in the ledger), ``secret`` 32 random bytes in URL-safe base64 (43
  characters). ``lfk_`` makes a leaked key recognizable (secret scanning: the pattern
  :data:`KEY_PATTERN`). Only its SHA-256 is stored: a key is 256 random bits, so its hash
  cannot be reversed or guessed, and a lookup costs a hash and an index read. A password
  hash (argon2, ~50-150 ms by design) on every API call would be a denial of service
  waiting to happen and adds nothing for a secret nobody chose (docs/portal.md).
- An **invite token** is 32 random bytes in URL-safe base64, stored as its SHA-256: one
  time, with an expiry.
- A **password** (chosen by a person, so guessable) is hashed with argon2id
  (argon2-cffi's ``PasswordHasher``, RFC 9106's low-memory parameters). Rules
  (:func:`check_password`): 12 to 256 characters, and not containing the user's own e-mail
  address.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import NamedTuple

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from engine.identity.errors import WeakPassword

KEY_PREFIX = "lfk_"
KEY_PATTERN = re.compile(r"lfk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})", re.ASCII)
DISPLAY_SECRET = 4  # characters of the secret kept for display (prefix)
MIN_PASSWORD, MAX_PASSWORD = 12, 256


def digest(secret: str) -> str:
    """The SHA-256 (hex) a key or an invite token is stored and looked up as."""
    return hashlib.sha256(secret.encode()).hexdigest()


class NewKey(NamedTuple):
    id: str
    key: str  # shown once, never stored
    prefix: str  # lfk_<id>_<4 characters of the secret>: enough to tell keys apart
    hash: str


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    key = f"{KEY_PREFIX}{key_id}_{secret}"
    return NewKey(key_id, key, f"{KEY_PREFIX}{key_id}_{secret[:DISPLAY_SECRET]}", digest(key))


def key_id(key: str) -> str | None:
    """The id of a well-formed key, else None (nothing to look up)."""
    m = KEY_PATTERN.fullmatch(key)
    return m.group(1) if m else None


def looks_like_key(token: str) -> bool:
    """A bearer token meant as a buyer key (well-formed or not): never a tenant token."""
    return token.startswith(KEY_PREFIX)


def new_invite_token() -> str:
    return secrets.token_urlsafe(32)


SESSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)


def new_session_token() -> str:
    """A portal session's token (the cookie's value): 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(32)


def looks_like_session(token: str) -> bool:
    return SESSION_PATTERN.fullmatch(token) is not None


def check_password(password: str, email: str) -> None:
    """WeakPassword unless 12 to 256 characters and free of the user's e-mail address."""
    if len(password) < MIN_PASSWORD:
        raise WeakPassword(f"a password has at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"a password has at most {MAX_PASSWORD} characters")
    if email and email.lower() in password.lower():
        raise WeakPassword("a password must not contain your e-mail address")


class Passwords:
    """argon2id hashing (CPU- and memory-hard by design: call it off the event loop)."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        """The hash was made with other parameters than the hasher's (a library upgrade
        raised them): the right password is hashed again at login."""
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return False
