"""``python -m bench ping``'s machinery with tiny counts, so it cannot rot: the buyers'
delays, the overhead arithmetic, one short run of every phase, and the instruction
counter's child without valgrind. No assertion on speed."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

from bench import common, ingest_instructions, ping, pingfarm

KEYS = ("ceiling_per_s", "engine_per_s", "ping_ratio", "open_loop_rate_per_s",
        "slowest_answer_p50_ms", "engine_cpu_ms_per_ping", "ceiling_cpu_ms_per_ping",
        "ping_ratio_per_cpu")


def test_buyer_delays_are_fixed_per_buyer_and_within_20_to_80_ms() -> None:
    for buyer in range(ping.BUYERS):
        lo, hi = pingfarm.profile(ping.SEED, buyer)
        assert 20.0 <= lo < hi <= 80.0 and hi - lo >= 10.0
        delays = [pingfarm.delay_ms(ping.SEED, buyer, f"{z:05d}") for z in range(200)]
        assert all(lo <= d <= hi for d in delays)
        assert delays == [pingfarm.delay_ms(ping.SEED, buyer, f"{z:05d}") for z in range(200)]
    assert pingfarm.slowest_ms(ping.SEED, 3, "94105") == max(
        pingfarm.delay_ms(ping.SEED, b, "94105") for b in range(3))


def test_overhead_is_latency_less_the_slowest_answer_of_that_ping() -> None:
    samples = [(0, 0.0525), (1, 0.0810), (0, 0.0500)]  # (body index, latency s)
    slowest = [50.0, 80.0]
    got = ping.overhead(samples, slowest)
    assert got["p50_ms"] == pytest.approx(1.0) and got["max_ms"] == pytest.approx(2.5)


def test_ping_benchmark_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = ping.run(duration=0.5, concurrency=8, warmup=10, instructions=False, quiet=True)
    ping.report(result)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in KEYS:
        assert isinstance(line[key], int | float) and line[key] > 0, key
    for key in ("ping_overhead_p50_ms", "ping_overhead_p99_ms", "ceiling_overhead_p99_ms"):
        assert isinstance(line[key], int | float), key
    for loop in ("closed_loop", "open_loop"):
        for side in ("engine", "ceiling"):
            phase = line[loop][side]
            assert phase["errors"] == 0 and set(phase["status_counts"]) == {"200"}
            assert phase["buyer_requests_per_ping"] == ping.BUYERS  # every buyer asked
    assert line["engine_bid_timeouts"] == 0 and line["engine_pings_accepted"] > 0


def test_ping_instructions_driver(tmp_path) -> None:
    """What ``count_instructions`` runs under callgrind (the service in-process, pings
    through the ASGI app to the real buyers; the bare fan-out), run here without valgrind
    with a few pings."""
    with ping.buyer_farm() as (urls, _):
        config = ping.ping_config(urls, tmp_path)
        cfg = common.load_config(config)
        bodies, _ = ping.ping_bodies(cfg, 5, seed=9)
        path = tmp_path / "ping.pickle"
        path.write_bytes(pickle.dumps(bodies))
        before = ping.buyer_requests(urls)
        with common.funded_redis(cfg) as srv:
            ingest_instructions.child("ping", srv.url, str(path), len(bodies), str(config))
        assert ping.buyer_requests(urls) - before == 5 * ping.BUYERS
        # and the ceiling's (bench.pingfarm count): the same pings, fanned out bare
        asyncio.run(pingfarm.fan_many([u + "/bid" for u in urls], bodies, 2))
        assert ping.buyer_requests(urls) - before == 10 * ping.BUYERS
