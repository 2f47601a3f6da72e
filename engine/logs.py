"""Structured JSON logs: one line per event, ids included, secrets and PII never.

Log calls pass ids through ``extra={...}``; only whitelisted keys are written, so a lead's
fields or a token can never reach the log by accident.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_SAFE_EXTRA = frozenset(
    {
        "tenant",
        "account",
        "buyer",
        "campaign",
        "supplier",
        "lead_id",
        "status",
        "code",
        "port",
        "url",
        "source",
        "attempt",
        "outcome",
        "stream",
        "group",
        "consumer",
        "count",
        "event",
        "seconds",
        "balance",
        "reason",
        "entry",
        "payment_intent",
    }
)
_enc = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _SAFE_EXTRA:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__
        return _enc.encode(out).decode()


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("leadflow")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.Formatter.converter = time.gmtime
