"""The HTTP server's limits (engine.api.server), over real sockets: idle and slow clients
are cut off, oversized headers refused, the connection count bounded, and a burst over many
tenants queues for Redis connections instead of answering 503."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from engine.run import configfile
from engine.store.store import connect
from tests.helpers.buyers import SECRET, buyer_servers
from tests.helpers.harness import BASE_TOML, buyer, campaign, make_config, running

LIMITS = """
[settings]
header_timeout_s = 0.5
body_timeout_s = 0.5
keepalive_timeout_s = 0.5
max_connections = 40
max_header_bytes = 8192
max_headers = 50
"""
FORM = (b"lp_campaign_id=camp&lp_supplier_id=s1&lp_key=key-s1&email=drip%40example.com"
        b"&phone=4155550100&state=CA")
RULES = 'accept = [{ path = "status", equals = "accepted" }]'
WAIT = 10  # seconds a test waits for the server to act before failing (never reached)


@pytest.fixture
def cfg():
    return make_config(campaign(), buyer("b1", price="10.00"), base=LIMITS + BASE_TOML)


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _answer(reader: asyncio.StreamReader) -> tuple[int | None, dict[str, object] | None]:
    """Read until the server closes: (status, JSON body), or (None, None) if it closed
    without answering."""
    raw = await asyncio.wait_for(reader.read(), WAIT)
    if not raw:
        return None, None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, msgspec.json.decode(body) if body else None


async def _drip(writer: asyncio.StreamWriter, data: bytes) -> None:
    """A slow client: a byte every 50 ms until the server closes the connection."""
    for i in range(len(data)):
        if writer.is_closing():
            return
        writer.write(data[i:i + 1])
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(0.05)


async def test_idle_connections_that_never_send_a_request_are_closed(redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        conns = [await _open(eng.url) for _ in range(30)]
        answers = await asyncio.gather(*(_answer(r) for r, _ in conns))
        assert answers == [(None, None)] * 30  # closed, nothing to answer
        for _, w in conns:
            w.close()
        status, _ = await eng.lead(email="after@example.com", phone="4155550101", state="CA")
        assert status == 200


async def test_headers_sent_a_byte_at_a_time_get_408(redis, redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        reader, writer = await _open(eng.url)
        head = (b"POST /v1/leads HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n")
        drip = asyncio.create_task(_drip(writer, head))
        status, body = await _answer(reader)
        await drip
        writer.close()
        assert status == 408 and body is not None
        assert body["error"]["code"] == "header_timeout"  # type: ignore[index]
        assert await redis.dbsize() == before


async def test_a_body_sent_a_byte_at_a_time_gets_408_and_nothing_is_decided(redis, redis_server,
                                                                           cfg):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        reader, writer = await _open(eng.url)
        writer.write(b"POST /v1/leads HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(FORM) + 5))
        # the whole lead arrives, but never the 5 bytes the header promised
        drip = asyncio.create_task(_drip(writer, FORM))
        status, body = await _answer(reader)
        drip.cancel()
        writer.close()
        assert status == 408 and body is not None
        assert body["error"]["code"] == "body_timeout"  # type: ignore[index]
        assert await redis.dbsize() == before  # no lead decided on the partial body


async def test_a_client_gone_mid_body_has_nothing_decided(redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        opening = await eng.balance("c1")
        _, writer = await _open(eng.url)
        writer.write(b"POST /v1/leads HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(FORM) + 5) + FORM)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # a lead on another connection, after the first one's end: the only sale
        status, body = await eng.lead(email="next@example.com", phone="4155550102", state="CA")
        assert (status, body["status"]) == (200, "ACCEPTED")
        assert await eng.balance("c1") == opening - 10_000_000
        await eng.assert_reconciled()


async def test_a_kept_alive_connection_idle_past_its_timeout_is_closed(redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        reader, writer = await _open(eng.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), WAIT)  # answered, then closed when idle
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("head", [
    b"X-Big: " + b"a" * 200_000 + b"\r\n",  # one 200 KB header
    b"".join(b"X-H%d: v\r\n" % i for i in range(5_000)),  # 5,000 headers
    b"".join(b"X-H%d: v\r\n" % i for i in range(51)),  # one over max_headers, small
], ids=["200KB-header", "5000-headers", "51-headers"])
async def test_oversized_headers_get_431(redis, redis_server, cfg, head):
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        reader, writer = await _open(eng.url)
        writer.write(b"POST /v1/leads HTTP/1.1\r\nHost: x\r\n" + head +
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(FORM) + FORM)
        with contextlib.suppress(ConnectionError):  # closed before it read everything
            await writer.drain()
        status, body = await _answer(reader)
        writer.close()
        assert status == 431 and body is not None
        assert body["error"]["code"] in ("headers_too_large", "too_many_headers")  # type: ignore[index]
        assert await redis.dbsize() == before


async def _answered_unread(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose POST to an unknown path was answered (404) before its body came:
    the application never reads that body."""
    reader, writer = await _open(url)
    writer.write(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 404")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return reader, writer


async def test_a_request_after_a_body_answered_unread_still_has_its_header_bounds(
        redis_server, cfg):
    """The body's end was not tracked when the response had gone first (uvicorn ignores
    it then): the connection stayed in its body phase, and the next request on it had no
    header size bound (a 200 KB header was served 200) nor header timeout."""
    async with running(cfg, redis_server.url) as eng:
        reader, writer = await _answered_unread(eng.url)
        writer.write(b"xx" + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                     + b"a" * 200_000 + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        status, body = await _answer(reader)
        writer.close()
        assert status == 431 and body is not None
        assert body["error"]["code"] == "headers_too_large"  # type: ignore[index]


async def test_a_body_answered_unread_and_never_finished_gets_no_second_answer(
        redis_server, cfg):
    """Cut off at the body timeout, but the request was answered already: no 408 after
    the 404 (a second response to one request)."""
    async with running(cfg, redis_server.url) as eng:
        reader, writer = await _answered_unread(eng.url)
        writer.write(b"x")  # one byte of two (it also stops the keep-alive timer)
        rest = await asyncio.wait_for(reader.read(), WAIT)  # closed at the body timeout
        writer.close()
        assert rest == b""


async def test_a_slow_body_does_not_hold_the_shutdown_past_its_timeout(redis, redis_server,
                                                                        cfg):
    """The limits are swept on uvicorn's tick, which stops when the server starts shutting
    down; uvicorn then waits for every connection (timeout_graceful_shutdown, 30 s): a
    client dripping a body held stop() 30 s and then had every running request cancelled."""
    async with running(cfg, redis_server.url) as eng:
        before = await redis.dbsize()
        reader, writer = await _open(eng.url)
        writer.write(b"POST /v1/leads HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(FORM) + 5) + FORM)
        await writer.drain()
        await asyncio.sleep(0.2)  # the request is read: its body phase has begun
        await asyncio.wait_for(eng.svc.stop(), WAIT)  # 0.5 s body timeout, not 30 s
        status, body = await _answer(reader)
        writer.close()
        assert status == 408 and body is not None
        assert body["error"]["code"] == "body_timeout"  # type: ignore[index]
        assert await redis.dbsize() == before


async def test_headers_within_the_limits_are_served(redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        headers = {f"X-H{i}": "v" * 100 for i in range(40)}  # ~4.5 KB, 40 headers
        async with eng.http.get(eng.url + "/healthz", headers=headers) as r:
            assert r.status == 200


async def test_connections_past_max_connections_get_503(redis_server, cfg):
    async with running(cfg, redis_server.url) as eng:
        idle = [await _open(eng.url) for _ in range(40)]  # max_connections = 40
        reader, writer = await _open(eng.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert raw.startswith(b"HTTP/1.1 503")
        for _, w in [*idle, (reader, writer)]:
            w.close()


def _tenants_config(n: int) -> str:
    parts = ["[settings]\nbatch_inflight = 2\n"]
    for i in range(n):
        parts.append(f"""
[[tenants]]
id = "t{i}"
api_token = "tok-{i}"
[tenants.wallet]
opening_balance = "1000.00"
[[clients]]
tenant = "t{i}"
id = "c{i}"
opening_balance = "1000.00"
[[suppliers]]
tenant = "t{i}"
id = "s{i}"
key = "key-{i}"
[[campaigns]]
tenant = "t{i}"
id = "camp{i}"
fields = [{{ name = "email", type = "email", required = true }}]
[[buyers]]
tenant = "t{i}"
id = "b{i}"
campaign = "camp{i}"
client = "c{i}"
price = "1.00"
""")
    return "".join(parts)


async def test_a_burst_over_64_tenants_queues_for_redis_instead_of_503(redis_server):
    """Each tenant is its own Lua call (its keys share one slot): 64 tenants with 2 calls in
    flight each are 128 calls at once, past a 64-connection pool. They must queue."""
    cfg = configfile.loads(_tenants_config(64), source="<test>")
    async with running(cfg, redis_server.url) as eng:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def post(t: int, n: int) -> int:
                lead = {"lp_campaign_id": f"camp{t}", "lp_supplier_id": f"s{t}",
                        "lp_key": f"key-{t}", "email": f"l{n}@t{t}.example.com"}
                async with http.post(eng.url + "/v1/leads", json=lead) as r:
                    await r.read()
                    return r.status

            for round_ in range(3):
                statuses = await asyncio.gather(
                    *(post(t, round_ * 10 + n) for n in range(6) for t in range(64)))
                assert statuses.count(503) == 0
                assert set(statuses) == {200}
        await eng.assert_reconciled()


async def test_the_redis_pool_queues_when_every_connection_is_busy(redis_server):
    """Past max_connections a command waits for a released connection (QueueingPool),
    and gives up with a connection error only after its wait."""
    client = connect(redis_server.url, max_connections=2, pool_timeout_s=5.0)
    try:
        assert await asyncio.gather(*(client.ping() for _ in range(50))) == [True] * 50
        assert len(client.connection_pool._in_use_connections) == 0
        assert len(client.connection_pool._available_connections) <= 2
    finally:
        await client.aclose()
    client = connect(redis_server.url, max_connections=1, pool_timeout_s=0.2)
    try:
        held = await client.connection_pool.get_connection()
        with pytest.raises(RedisConnectionError, match="no Redis connection free"):
            await client.ping()
        await client.connection_pool.release(held)
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_a_waiter_woken_then_cancelled_passes_the_connection_on(redis_server):
    """A waiter cancelled after a release woke it must not keep the wake-up: the waiter
    behind it gets the free connection instead of waiting out its whole time-out."""
    client = connect(redis_server.url, max_connections=1, pool_timeout_s=30.0)
    pool = client.connection_pool
    try:
        held = await pool.get_connection()
        first = asyncio.create_task(client.ping())
        second = asyncio.create_task(client.ping())
        while len(pool._waiters) < 2:  # noqa: ASYNC110 - one loop turn at a time, no delay
            await asyncio.sleep(0)
        await pool.release(held)  # wakes the first
        first.cancel()
        assert await asyncio.wait_for(second, 10) is True  # not the 30 s time-out
        with contextlib.suppress(asyncio.CancelledError):
            await first
    finally:
        await client.aclose()


async def test_a_refused_pipelined_request_is_answered_after_the_one_before_it(redis_server):
    """Request 2, pipelined behind request 1 (a sync lead waiting for its buyer), passes the
    header limit: request 1 is still decided and answered first, whole, then the 431. The
    431 used to be written at once, read by the client as request 1's answer, while request
    1 went on and was charged with its answer dropped."""
    async with buyer_servers() as buyers:
        hook = f'delivery = {{ url = "{buyers.url}/slow", secret = "{SECRET}", {RULES} }}'
        cfg = make_config(campaign(extra='mode = "sync"\nsync_deadline_ms = 5000'),
                          buyer("b1", price="10.00", extra=hook), base=LIMITS + BASE_TOML)
        async with running(cfg, redis_server.url) as eng:
            opening = await eng.balance("c1")
            reader, writer = await _open(eng.url)
            writer.write(b"POST /v1/leads HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(FORM) + FORM)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
            await writer.drain()
            await buyers.reached("/slow")  # request 1 is with its buyer
            writer.write(b"a" * 20_000 + b"\r\n\r\n")  # request 2 passes 8 KiB of headers
            await writer.drain()
            buyers.release.set()
            raw = await asyncio.wait_for(reader.read(), WAIT)
            writer.close()
            first, _, rest = raw.partition(b"HTTP/1.1 431")
            assert first.startswith(b"HTTP/1.1 200") and b'"ACCEPTED"' in first, raw[:300]
            assert b"headers_too_large" in rest
            assert await eng.balance("c1") == opening - 10_000_000
            await eng.assert_reconciled()
