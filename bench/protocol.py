"""What the HTTP server's limits cost a request, in CPU instructions under callgrind.

``python -m bench protocol [--requests 20000]``: one keep-alive connection's worth of
``POST /v1/leads`` requests (a lead's headers and a 300-byte JSON body, as a seller sends
them) is fed to uvicorn's httptools protocol and to leadflow's (:mod:`engine.api.server`,
the header/body timeouts and header bounds), each answered by a trivial ASGI app that reads
the body and answers 200. Each protocol runs in a child process under ``valgrind
--tool=callgrind`` once with N requests and once with none; the difference divided by N is
what one request costs, and the two are compared. ``bench ingest --instructions`` drives
the app without an HTTP server, so it cannot see this part.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from bench import common
from engine.api.server import Limits, protocol_for
from engine.core.config import Settings

BODY = (b'{"lp_campaign_id":"solar","lp_supplier_id":"aff-101","lp_key":"k-aff-101-demo",'
        b'"first_name":"Jane","last_name":"Doe","email":"jane@example.com",'
        b'"phone":"(415) 555-2671","state":"CA","zip":"94105","monthly_bill":250,'
        b'"homeowner":true,"roof_type":"metal","lp_subid1":"abc","ip_address":"1.2.3.4"}')
REQUEST = (b"POST /v1/leads HTTP/1.1\r\nHost: leads.example.com\r\n"
           b"User-Agent: seller-client/2.1\r\nAccept: */*\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


async def _app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


class _Transport(asyncio.Transport):
    """Enough of a socket transport for the protocol: writes are counted and dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


async def _feed(kind: str, n: int) -> None:
    config = uvicorn.Config(_app, http="httptools", ws="none", lifespan="off",
                            log_config=None, access_log=False)
    config.load()
    cls = HttpToolsProtocol if kind == "plain" else protocol_for(Limits.of(Settings()))
    state = ServerState()
    proto = cls(config=config, server_state=state, app_state={})
    transport = _Transport()
    proto.connection_made(transport)
    for _ in range(n):
        proto.data_received(REQUEST)
        await asyncio.gather(*state.tasks)  # the request answered before the next one
    if n and transport.written < n * 40:
        raise RuntimeError("the protocol did not answer every request")


def _child(kind: str, n: int) -> None:
    uvloop.run(_feed(kind, n))


def count(kind: str, n: int) -> float:
    """Instructions per request of one protocol: (run with n) - (run with 0), over n."""
    totals = []
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-proto-") as tmp:
        for reqs in (n, 0):
            out = Path(tmp) / f"callgrind.{kind}.{reqs}"
            subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, "-m", "bench.protocol", "--child", kind, str(reqs)],
                check=True, capture_output=True)
            totals.append(common.callgrind_total(out))
    return (totals[0] - totals[1]) / n


def run(n: int) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    plain, guarded = count("plain", n), count("guarded", n)
    result = {"requests": n, "uvicorn_httptools": round(plain), "leadflow_guarded": round(guarded),
              "added_per_request": round(guarded - plain),
              "ratio": round(guarded / plain, 4)}
    common.log(f"protocol: uvicorn httptools {plain:,.0f} instructions a request, with "
               f"leadflow's limits {guarded:,.0f} (+{guarded - plain:,.0f}, "
               f"{guarded / plain:.3f}x)")
    return result


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench protocol", description=__doc__)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    print(run(args.requests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
