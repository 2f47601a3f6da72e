"""Outside input (request bodies, query strings, headers, buyers' responses) read without an
exception its sender did not earn: what may go wrong is a documented refusal, never a 500.

JSON: msgspec's decoder recurses once per nested array or object (an untyped decode, and a
typed one skipping an unknown field's value) and raises :class:`RecursionError`, which is
not a :class:`msgspec.DecodeError`, past the interpreter's recursion limit: about 1,000
levels, ``'[' * 1000``, 2 KB. Every decode of outside JSON catches :data:`JSON_ERRORS`;
naming it in an ``except`` costs a valid body nothing.
"""

from __future__ import annotations

from typing import Final

import msgspec

JSON_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
TOO_DEEP: Final = "JSON nested too deeply (arrays and objects, about 1,000 levels)"


def json_problem(exc: BaseException, otherwise: str) -> str:
    """The message of a body that raised one of :data:`JSON_ERRORS`: :data:`TOO_DEEP` for
    nesting past the decoder's limit, else ``otherwise`` (invalid JSON or UTF-8)."""
    return TOO_DEEP if isinstance(exc, RecursionError) else otherwise

