"""Structured JSON logs: one line per event, ids included, secrets and PII never.

Log calls pass ids through ``extra={...}``; only whitelisted keys are written, so a lead's
fields or a token can never reach the log by accident. An exception is written as its class
name and the code locations of its traceback (``file:line function``), never its message
or any value.

Every record of the process goes through the same formatter: leadflow's own loggers at INFO,
everything else (uvicorn, asyncio, libraries, ``warnings``) at WARNING through the root
logger, and uncaught exceptions through ``sys.excepthook``, so stderr is JSON lines only.
"""

from __future__ import annotations

import logging
import sys
import traceback
from types import TracebackType

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
        "worker",
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
            out["trace"] = _where(record.exc_info[2])
        return _enc.encode(out).decode()


def _where(tb: TracebackType | None, limit: int = 8) -> list[str]:
    """The innermost ``limit`` frames as ``file:line function``: code, never data."""
    frames = traceback.extract_tb(tb)[-limit:]
    return [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames]


_PACKAGES = frozenset({"engine", "billing", "tests", "bench"})


def _short(path: str) -> str:
    """A frame's file from its top-level package on (``engine/obs/logs.py``), else its last
    two parts (``asyncio/events.py``): no home or site-packages directory in a log line."""
    parts = path.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in _PACKAGES:
            return "/".join(parts[i:])
    return "/".join(parts[-2:])


def _excepthook(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("leadflow").critical("uncaught exception", exc_info=(kind, exc, tb))


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only
    ours = logging.getLogger("leadflow")
    ours.handlers[:] = []
    ours.setLevel(level)
    ours.propagate = True
    logging.captureWarnings(True)  # `warnings` go to the py.warnings logger, as JSON
    sys.excepthook = _excepthook
