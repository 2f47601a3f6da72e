"""Shared fixtures: a real redis-server started by the tests on a free port.

The server is ours (a temp dir, a free port), so flushing it between tests is safe; a Redis
already running on the machine is never touched.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from engine.store.embedded import EmbeddedRedis
from tests.helpers import ROOT

pytest_plugins = ("tests.helpers.stripe_fixture", "tests.helpers.billing_fixtures",
                  "tests.helpers.smtp", "tests.helpers.sendgrid", "tests.helpers.postgres",
                  "tests.helpers.buyers")

EXAMPLE_CONFIG = ROOT / "config" / "example.toml"


# Hermetic: settings the engine reads from the environment must come from the tests, never
# from the machine (a LEADFLOW_REDIS_URL pointing at a real Redis, a real Stripe key, a
# multiprocess metrics dir). Tests that want one set it themselves (monkeypatch, or the
# env of a subprocess they start).
for _name in ("LEADFLOW_REDIS_URL", "LEADFLOW_CONFIG", "LEADFLOW_STRIPE_SECRET_KEY",
              "LEADFLOW_STRIPE_API_BASE", "LEADFLOW_REVISION", "PROMETHEUS_MULTIPROC_DIR"):
    os.environ.pop(_name, None)

SEED = int(os.environ.get("LEADFLOW_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)


def pytest_report_header(config: pytest.Config) -> str:
    return f"leadflow test seed: {SEED} (rerun with LEADFLOW_TEST_SEED={SEED})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # again at the end: `-q` hides the header, and a failure is read from the bottom up
    terminalreporter.write_line(pytest_report_header(terminalreporter.config))


@pytest.fixture(scope="session")
def seed() -> int:
    return SEED


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False)
    with server:
        yield server


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()  # our own server, started above
    yield client
    await client.aclose()
