"""A lead's dedupe fingerprints as the hot path makes them (engine.routing.plans._Printer,
from hash states of the scope and field names) are :func:`fingerprint` of the documented
text: the marks already in Redis keep matching."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from engine.core.config import Dedupe
from engine.ingest.ingest import digest
from engine.routing.plans import _Printer, fingerprint

FIELDS = ["email", "phone", "zip"]
values = st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=300))  # "" included


@given(values, st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True),
       st.text(min_size=1, max_size=40))
def test_printer_is_fingerprint_of_the_values(lead: dict[str, str], fields: list[str],
                                              scope: str) -> None:
    any_of = _Printer(Dedupe(fields=fields, match="any"), scope)
    assert any_of(lead) == [fingerprint(scope, [f, lead[f]]) for f in fields if lead.get(f)]
    all_of = _Printer(Dedupe(fields=fields, match="all"), scope)
    present = [lead.get(f, "") for f in fields]
    assert all_of(lead) == ([fingerprint(scope, [*fields, *present])] if all(present)
                            else [])


@given(st.text(min_size=1, max_size=40), st.binary(max_size=600))
def test_the_idempotency_digest_is_the_documented_hash(scope: str, data: bytes) -> None:
    """engine.ingest.ingest.digest copies a per-scope hash state: the same key as hashing
    scope, NUL and the data at once."""
    want = hashlib.blake2b(scope.encode() + b"\x00" + data, digest_size=16,
                           person=b"leadflow-idem").hexdigest()
    assert digest(scope, data) == want == digest(scope, data)
