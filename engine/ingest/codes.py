"""What a seller is answered: the lead response and its numeric codes (README, "Response
codes"). Shared by ingest, the sync waterfall and the app."""

from __future__ import annotations

import msgspec

from engine.routing.fields import FieldError


class LeadResponse(msgspec.Struct):
    status: str  # ACCEPTED | DUPLICATED | REJECTED | ERROR
    code: int
    message: str = ""
    lead_id: str | None = None
    payout: str | None = None
    test: bool = False
    errors: list[FieldError] = []


class Codes:
    """Numeric ``code`` of every response (README: "Response codes")."""

    ACCEPTED = 0
    ACCEPTED_PENDING = 1  # sync mode: a waterfall still running (or cut off by a crash)
    DUPLICATED = 100  # a lead with the same dedupe values was sold (ping: their hashes)
    ALL_DUPLICATED = 101  # duplicate for every matching buyer (buyer-scope dedupe)
    # REJECTED: 200 no buyer matched, 201 all at caps, 202 paused/unfunded, 203 tenant wallet
    ALL_REJECTED = 204  # sync mode: every buyer the lead was sent to rejected it
    NO_VERDICT = 205  # sync mode: the deadline passed before a buyer accepted
    NO_BID = 206  # ping-post: no eligible buyer bid on the ping (or none could be held)
    MALFORMED = 1000
    MISSING_CREDENTIALS = 1001
    TOO_MANY_FIELDS = 1003
    UNKNOWN_CAMPAIGN = 1010
    UNAUTHORIZED = 1011
    FORBIDDEN = 1012
    INVALID_FIELDS = 1020
    TOO_LARGE = 1030
    UNSUPPORTED_MEDIA = 1031
    UNAVAILABLE = 1040
    NOT_DECIDED = 1050  # decide.lua failed on this lead and took its writes back
    # ping-post (docs/pingpost.md)
    NOT_PING_POST = 1060  # the campaign takes no pings
    UNKNOWN_PING = 1061  # no such ping of this tenant and campaign
    PING_POSTED = 1062  # the ping was already posted (another post, not a replay)
    PING_FIELD_CHANGED = 1063  # the post's value of a ping field differs from the ping's
    PING_EXPIRED = 1064  # the ping expired (or its holds were released) before the post
    PING_SUPPLIER = 1065  # the ping was made by another supplier
    UNKNOWN_BID = 1066  # shared: a bid_id that is not one of the ping's offered bids


def error(code: int, message: str, errors: list[FieldError] | None = None) -> LeadResponse:
    return LeadResponse(status="ERROR", code=code, message=message, errors=errors or [])
