"""The ping benchmark's loopback servers (bench.ping), each in its own process.

``python -m bench.pingfarm buyers SEED FIRST PORT...``: ping buyers, one aiohttp server per
port on one uvloop event loop, buyer number ``FIRST``, ``FIRST + 1``, ... in port order.
``POST /bid`` answers ``{"bid": "<dollars>"}`` after :func:`delay_ms` of the request's
``zip`` field: each buyer has its own fixed, seeded spread within 20-80 ms
(:func:`profile`) and a ping's place in it is a hash of its zip, so whoever knows a ping's
zip (the load generator's side of bench.ping) knows how long each buyer made it wait.
``GET /stats`` gives ``{"requests": n, "bad": m}`` (``bad``: a ``POST /bid`` without a
zip, answered 400 at once). The Standard Webhooks signature is not verified: that is the
buyer's CPU, not the engine's.

``python -m bench.pingfarm fanout PORT URL...``: the ceiling, a bare aiohttp fan-out with no
engine logic: per request it POSTs the request's body to every URL in parallel on one
client session (the engine's connector settings, engine.delivery.client.new_session),
each with the engine's default per-buyer timeout, and answers
``{"answered": n}`` once all have answered (:class:`FanOut`).

``python -m bench.pingfarm count BODIES N CONCURRENCY URL...``: the first N bodies of the
pickled list BODIES fanned out with no HTTP server in front (:func:`fan_many`), what
bench.ping counts under callgrind as the ceiling's instructions per ping.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web

from engine.delivery.client import new_session

LO_MS, HI_MS = 20.0, 80.0
BUYER_TIMEOUT_S = 0.5  # engine.core.config.Ping.timeout_ms's default
_dec = msgspec.json.Decoder(dict[str, object])


def profile(seed: int, buyer: int) -> tuple[float, float]:
    """Buyer ``buyer``'s spread of answer delays, ms: a fixed, seeded [lo, hi] within
    20-80 ms at least 10 ms wide."""
    rng = random.Random(f"ping-buyer:{seed}:{buyer}")
    lo = rng.uniform(LO_MS, 50.0)
    return lo, rng.uniform(lo + 10.0, HI_MS)


def _unit(seed: int, buyer: int, zip_code: str, what: str) -> int:
    digest = hashlib.blake2b(f"{what}:{seed}:{buyer}:{zip_code}".encode(), digest_size=8)
    return int.from_bytes(digest.digest())


def delay_ms(seed: int, buyer: int, zip_code: str, spread: tuple[float, float] | None = None
             ) -> float:
    """How long buyer ``buyer`` waits before it answers a ping with this zip, ms."""
    lo, hi = spread or profile(seed, buyer)
    return lo + (hi - lo) * _unit(seed, buyer, zip_code, "delay") / 2**64


def bid(seed: int, buyer: int, zip_code: str) -> str:
    """Buyer ``buyer``'s bid for a ping with this zip: $1.00 to $9.99."""
    cents = 100 + _unit(seed, buyer, zip_code, "bid") % 900
    return f"{cents // 100}.{cents % 100:02d}"


def slowest_ms(seed: int, buyers: int, zip_code: str) -> float:
    """The slowest of ``buyers`` buyers' answers to a ping with this zip, ms: what a
    fan-out to all of them waits for at least."""
    return max(delay_ms(seed, b, zip_code) for b in range(buyers))


def _buyer_app(seed: int, buyer: int) -> web.Application:
    spread = profile(seed, buyer)
    stats = {"requests": 0, "bad": 0}

    async def bid_route(request: web.Request) -> web.Response:
        stats["requests"] += 1
        try:
            zip_code = _dec.decode(await request.read()).get("zip")
        except msgspec.DecodeError:
            zip_code = None
        if not isinstance(zip_code, str):
            stats["bad"] += 1
            return web.json_response({"error": "no zip"}, status=400)
        # the buyer's think time
        await asyncio.sleep(delay_ms(seed, buyer, zip_code, spread) / 1_000)
        return web.json_response({"bid": bid(seed, buyer, zip_code)})

    async def stats_route(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_post("/bid", bid_route)
    app.router.add_get("/stats", stats_route)
    return app


class FanOut:
    """The ceiling's whole logic: one body POSTed to every URL in parallel on one client
    session (the engine's connector settings), each with the engine's default per-buyer
    timeout; the number of 200 answers."""

    def __init__(self, urls: Sequence[str], timeout_s: float = BUYER_TIMEOUT_S) -> None:
        self.urls = list(urls)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.headers = {"content-type": "application/json"}
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = new_session()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _one(self, url: str, body: bytes) -> bool:
        assert self.session is not None
        try:
            async with self.session.post(url, data=body, headers=self.headers,
                                         timeout=self.timeout, allow_redirects=False) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def __call__(self, body: bytes) -> int:
        return sum(await asyncio.gather(*(self._one(url, body) for url in self.urls)))


def _fanout_app(urls: Sequence[str]) -> web.Application:
    fan = FanOut(urls)

    async def route(request: web.Request) -> web.Response:
        return web.json_response({"answered": await fan(await request.read())})

    async def start(app: web.Application) -> None:
        await fan.start()

    async def close(app: web.Application) -> None:
        await fan.close()

    app = web.Application()
    app.router.add_post("/v1/ping", route)
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


async def fan_many(urls: Sequence[str], bodies: Sequence[bytes], concurrency: int) -> None:
    """Every body fanned out, ``concurrency`` at a time, with no HTTP server in front (what
    ``count`` runs under callgrind, as the engine's count has none); every buyer must
    answer (within 10 s each: valgrind runs Python ~50x slower)."""
    fan = FanOut(urls, timeout_s=10.0)
    await fan.start()
    todo = iter(bodies)

    async def client() -> None:
        for body in todo:
            if await fan(body) != len(urls):
                raise RuntimeError("a buyer did not answer the fan-out")

    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        await fan.close()


async def _serve(apps: Sequence[tuple[web.Application, int]]) -> None:
    runners = []
    for app, port in apps:  # in order: the caller waits for the last port
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # uvicorn's backlog (the engine's); aiohttp's 128 stalls a burst of connections
        await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
        runners.append(runner)
    try:
        await asyncio.Event().wait()  # until SIGTERM ends the process
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: Sequence[str]) -> int:
    import uvloop

    if argv[:1] == ["buyers"] and len(argv) >= 4:
        seed, first = int(argv[1]), int(argv[2])
        apps = [(_buyer_app(seed, first + i), int(port)) for i, port in enumerate(argv[3:])]
    elif argv[:1] == ["fanout"] and len(argv) >= 3:
        apps = [(_fanout_app(argv[2:]), int(argv[1]))]
    elif argv[:1] == ["count"] and len(argv) >= 5:  # count BODIES N CONCURRENCY URL...
        bodies = pickle.loads(Path(argv[1]).read_bytes())[:int(argv[2])]
        uvloop.run(fan_many(argv[4:], bodies, int(argv[3])))
        return 0
    else:
        print(__doc__, file=sys.stderr)
        return 2
    uvloop.run(_serve(apps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
