"""The balance export against real redis-servers: the blocking client built from the
engine's Redis URL (engine.obs.metrics.blocking_redis_client) and what a scrape exports for it.

Each test that changes a server (ACL users, SIGSTOP) starts its own redis-server; the
cluster test forms a real 3-node cluster (tests/helpers/cluster.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from engine.core import keys
from engine.obs.metrics import BalanceCollector, blocking_redis_client, redis_balance_source, render
from engine.store.embedded import EmbeddedRedis, free_port
from engine.store.store import Store
from tests.helpers import ROOT
from tests.helpers.cluster import redis_cluster

ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool")

WALLET = ("t1", "wallet")


def _scrape(client: Any, accounts: list[tuple[str, str]], *, max_accounts: int = 500
            ) -> tuple[dict[str, Any], float]:
    """One scrape of a registry holding only the balance export: (families, seconds)."""
    registry = CollectorRegistry()
    registry.register(BalanceCollector(redis_balance_source(client, accounts),
                                       max_accounts=max_accounts))
    start = time.perf_counter()
    body, _ = render(registry)
    elapsed = time.perf_counter() - start
    return {f.name: f for f in text_string_to_metric_families(body.decode())}, elapsed


def _values(fams: dict[str, Any], name: str) -> dict[tuple[str, str], float]:
    fam = fams.get(name)
    return {} if fam is None else {
        (s.labels["tenant"], s.labels["account"]): s.value for s in fam.samples}


def _up(fams: dict[str, Any]) -> float:
    return float(fams["leadflow_account_balance_source_up"].samples[0].value)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test only (it gets stopped, or users added)."""
    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server:
        yield server


def _seed(url: str, *accounts: tuple[str, str, dict[str, Any]]) -> None:
    c = redis.Redis.from_url(url)
    try:
        for tenant, account, fields in accounts:
            c.hset(keys.acct(tenant, account), mapping=fields)
    finally:
        c.close()


def test_a_stopped_redis_fails_the_balance_read_within_the_timeout(
    own_redis: EmbeddedRedis,
) -> None:
    """SIGSTOP: connections are accepted by the kernel but never answered. The balance
    read gives up after its socket timeout (1 s) and the scrape succeeds with
    source_up 0; the engine's old client had no timeout: a scrape took 59 s."""
    _seed(own_redis.url, ("t1", "wallet", {"bal": 5_000_000, "floor": -20_000_000}))
    client = blocking_redis_client(own_redis.url)
    pid = own_redis.pid
    assert pid is not None
    try:
        fams, _ = _scrape(client, [WALLET])
        assert _up(fams) == 1
        os.kill(pid, signal.SIGSTOP)
        try:
            fams, elapsed = _scrape(client, [WALLET])  # a pooled connection: read timeout
            assert _up(fams) == 0 and elapsed < 3, elapsed
            client.connection_pool.disconnect()
            fams, elapsed = _scrape(client, [WALLET])  # a new connection, never answered
            assert _up(fams) == 0 and elapsed < 3, elapsed
        finally:
            os.kill(pid, signal.SIGCONT)
        fams, _ = _scrape(client, [WALLET])  # back: the next scrape reads again
        assert _up(fams) == 1
        assert _values(fams, "leadflow_account_balance_micros") == {WALLET: 5_000_000}
    finally:
        client.close()


def test_a_refused_connection_fails_the_scrape_at_once() -> None:
    """No retries with back-off: the engine's old client took about 4 s per scrape when
    Redis refused connections."""
    client = blocking_redis_client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        fams, elapsed = _scrape(client, [WALLET])
        assert _up(fams) == 0
        assert elapsed < 0.5, elapsed
    finally:
        client.close()


def test_acl_user_password_and_database_of_the_url_are_kept(own_redis: EmbeddedRedis) -> None:
    """redis://alice:pw@host/3 logs in as alice (the engine's old client sent the password
    as the default user's: AuthenticationError, source_up 0) and reads database 3."""
    admin = redis.Redis.from_url(own_redis.url)
    db3 = redis.Redis.from_url(own_redis.url.rsplit("/", 1)[0] + "/3")
    try:
        db3.hset(keys.acct(*WALLET), mapping={"bal": 7_000_000, "floor": -1_000_000})
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")  # only alice may log in
    finally:
        admin.close()
        db3.close()
    host_port = own_redis.url.removeprefix("redis://").split("/", 1)[0]
    client = blocking_redis_client(f"redis://alice:s3cret@{host_port}/3")
    try:
        fams, _ = _scrape(client, [WALLET])
        assert _up(fams) == 1
        assert _values(fams, "leadflow_account_balance_micros") == {WALLET: 7_000_000}
        assert _values(fams, "leadflow_account_floor_micros") == {WALLET: -1_000_000}
    finally:
        client.close()


def test_tls_settings_of_the_url_are_kept() -> None:
    """rediss:// (TLS) with its ssl_* parameters: the installed redis-server has no TLS, so
    this checks the client's connection settings, which the engine's old client dropped."""
    client = blocking_redis_client(
        "rediss://alice:pw@redis.example:6380/2?ssl_cert_reqs=required"
        "&ssl_ca_certs=/etc/ssl/ca.pem")
    try:
        pool = client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        kw = pool.connection_kwargs
        assert (kw["host"], kw["port"], kw["db"]) == ("redis.example", 6380, 2)
        assert (kw["username"], kw["password"]) == ("alice", "pw")
        assert (kw["ssl_cert_reqs"], kw["ssl_ca_certs"]) == ("required", "/etc/ssl/ca.pem")
        assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (1.0, 1.0)
    finally:
        client.close()


@pytest.mark.slow
def test_balances_on_a_redis_cluster_each_key_read_from_its_node(tmp_path: Path) -> None:
    """redis+cluster:// gives a cluster client (the engine's old code raised AttributeError:
    RedisCluster has no connection_pool); the HMGETs of tenants in slots of different
    nodes each go to their node."""
    with redis_cluster(tmp_path / "cluster") as nodes:
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        tenants = [f"t{i}" for i in range(12)]
        seed = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        try:
            owners = {seed.get_node_from_key(keys.acct(t, "wallet")).port for t in tenants}
            assert len(owners) == 3  # the accounts live on every node
            for i, t in enumerate(tenants):
                seed.hset(keys.acct(t, "wallet"), mapping={"bal": i, "floor": -20_000_000})
        finally:
            seed.close()
        client = blocking_redis_client(url)
        try:
            fams, _ = _scrape(client, [(t, "wallet") for t in tenants])
        finally:
            client.close()
        assert _up(fams) == 1
        assert _values(fams, "leadflow_account_balance_micros") == {
            (t, "wallet"): i for i, t in enumerate(tenants)}


# -- billing "none": no floor ----------------------------------------------------------------

async def _accounts(redis_url: str) -> None:
    """t1: wallet (manual, plenty), c-ok (manual, plenty), c-low (manual, opened below its
    floor), quotewizard (billing none, far below -20.00). Real accounts: account_settings.lua."""
    from engine.store.store import connect

    store = Store(connect(redis_url))
    try:
        for account, opening, mode in (("wallet", 500_000_000, "manual"),
                                       ("c-ok", 100_000_000, "manual"),
                                       ("c-low", -25_000_000, "manual"),
                                       ("quotewizard", -48_000_000, "none")):
            await store.redis.delete(keys.acct("t1", account))
            await store.apply_account_settings("t1", account, opening=opening,
                                               floor=-20_000_000, alert=0, recharge_threshold=0,
                                               auto_recharge=False, min_balance=None, mode=mode)
    finally:
        await store.redis.aclose()


ACCOUNTS = [("t1", "wallet"), ("t1", "c-ok"), ("t1", "c-low"), ("t1", "quotewizard")]


async def test_a_billing_none_account_is_exported_without_a_floor(redis, redis_server) -> None:
    await _accounts(redis_server.url)
    client = blocking_redis_client(redis_server.url)
    try:
        fams, _ = _scrape(client, ACCOUNTS)
        assert _values(fams, "leadflow_account_balance_micros")[("t1", "quotewizard")] == (
            -48_000_000)
        assert _values(fams, "leadflow_account_floor_micros") == {
            ("t1", "wallet"): -20_000_000, ("t1", "c-ok"): -20_000_000,
            ("t1", "c-low"): -20_000_000}
        # the top-N selection keeps accounts with a floor first, however low a billing
        # "none" balance goes: it used to crowd real accounts out of the 500
        fams, _ = _scrape(client, ACCOUNTS, max_accounts=3)
        assert set(_values(fams, "leadflow_account_balance_micros")) == {
            ("t1", "wallet"), ("t1", "c-ok"), ("t1", "c-low")}
        assert fams["leadflow_account_balance_source_accounts"].samples[0].value == 4
    finally:
        client.close()


def test_top_n_orders_floored_accounts_by_headroom_then_the_ones_without() -> None:
    rows = [("t", "none-a", -10**12, None), ("t", "b", 50, 0), ("t", "a", 5, 0),
            ("t", "none-b", 0, None)]
    registry = CollectorRegistry()
    registry.register(BalanceCollector(lambda: rows, max_accounts=3))
    body, _ = render(registry)
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(_values(fams, "leadflow_account_balance_micros")) == {
        ("t", "a"), ("t", "b"), ("t", "none-a")}
    assert set(_values(fams, "leadflow_account_floor_micros")) == {("t", "a"), ("t", "b")}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (CI installs it)")
async def test_floor_alerts_on_the_exported_series_skip_billing_none(
    redis, redis_server, tmp_path: Path
) -> None:
    """The series a real scrape exports, held for 10 minutes, through the real alert rules
    (promtool test rules): LeadflowWalletAtFloor fires for the manual account below its
    floor and not for the billing "none" account (it fired for good once its balance went
    below -20.00, the floor the export used to give it)."""
    await _accounts(redis_server.url)
    client = blocking_redis_client(redis_server.url)
    try:
        fams, _ = _scrape(client, ACCOUNTS)
    finally:
        client.close()
    series = []
    for name in ("leadflow_account_balance_micros", "leadflow_account_floor_micros"):
        for (tenant, account), value in _values(fams, name).items():
            series.append(f"      - series: '{name}{{tenant=\"{tenant}\", account=\"{account}\"}}'\n"
                          f"        values: '{int(value)}x15'")
    # c-low (manual) is 5.00 below its floor; quotewizard (none) 28.00 below -20.00
    test = textwrap.dedent("""\
        rule_files:
          - ALERTS
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
        SERIES
            alert_rule_test:
              - eval_time: 10m
                alertname: LeadflowWalletAtFloor
                exp_alerts:
                  - exp_labels: {severity: critical, tenant: t1, account: c-low}
                    exp_annotations:
                      summary: "Account t1/c-low is at or below its floor"
              - eval_time: 10m
                alertname: LeadflowWalletNearFloor
                exp_alerts:
                  - exp_labels: {severity: warning, tenant: t1, account: c-low}
                    exp_annotations:
                      summary: "Account t1/c-low is close to its floor"
                      description: "Headroom above the floor is -5000000 micros (1000000 = 1.00). Debits stop at the floor."
        """).replace("ALERTS", str(ALERTS)).replace("SERIES", "\n".join(series))
    path = tmp_path / "exported_test.yml"
    path.write_text(test)
    result = await asyncio.to_thread(subprocess.run, [PROMTOOL, "test", "rules", str(path)],
                                     capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode() + test
