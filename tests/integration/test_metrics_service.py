"""Service.export_balances end to end (needs engine/run/service.py to build its client with
engine.obs.metrics.blocking_redis_client): the engine's /metrics on an ACL user's Redis URL,
and on a Redis Cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from engine.store.embedded import EmbeddedRedis
from tests.helpers.cluster import redis_cluster
from tests.helpers.harness import make_config, running


async def _balances(eng) -> tuple[dict[tuple[str, str], float], float]:
    async with eng.http.get(eng.url + "/metrics") as r:
        assert r.status == 200
        body = (await r.read()).decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    bal = {(s.labels["tenant"], s.labels["account"]): s.value
           for s in fams["leadflow_account_balance_micros"].samples} if (
        "leadflow_account_balance_micros" in fams) else {}
    return bal, fams["leadflow_account_balance_source_up"].samples[0].value


async def test_export_balances_logs_in_as_the_urls_acl_user(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        url = f"redis://alice:s3cret@127.0.0.1:{server.port}/2"
        async with running(make_config(), url) as eng:
            eng.svc.export_balances()
            bal, up = await _balances(eng)
            assert up == 1
            assert bal[("t1", "c1")] == 100_000_000


@pytest.mark.slow
async def test_export_balances_on_a_redis_cluster(tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "cluster") as nodes:
        async with running(make_config(), f"redis+cluster://127.0.0.1:{nodes[0].port}") as eng:
            eng.svc.export_balances()  # raised AttributeError (no connection_pool)
            bal, up = await _balances(eng)
            assert up == 1
            assert bal[("t1", "c1")] == 100_000_000 and bal[("t2", "other")] == 5_000_000
