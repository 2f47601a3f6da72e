"""schemathesis against a live engine: every endpoint of GET /openapi.json, stateless and
stateful, seeded with the test seed; no 5xx, every response as the document says, and the
ledgers reconcile afterwards.

The engine runs the example config (config/example.toml) on the tests' own redis-server,
with localstripe as Stripe, so the card endpoints (attach, funds, refund-balance) run for
real instead of answering 503 stripe_not_configured. schemathesis is the CLI, run as a
subprocess against the engine's URL, as anyone would run it:

    schemathesis run URL/openapi.json --checks all --exclude-checks positive_data_acceptance
      --phases examples,coverage,fuzzing,stateful --seed SEED --max-examples N
      -H 'Authorization: Bearer acme-demo-token'

with tests/helpers/schemathesis_hooks.py (SCHEMATHESIS_HOOKS) giving a share of the valid cases
the ids the engine has. Its output is printed when it fails (and kept with -s).

positive_data_acceptance is the one check left out: it expects every schema-valid request
to be accepted (2xx/404/409), but the business rules no JSON Schema states (funding is at
least $100.00 in whole cents, a meter must be the tenant's, an auto-recharge amount covers
its daily cap, a batch repeats no event id, a pattern-valid cursor past 2^63) are refused
with a documented 400 code, as the document says for that status.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

import pytest

from engine.api.accounts import RETURN_REASONS
from engine.core import config as config_mod
from engine.core.config import resolve_secret
from engine.core.constants import WALLET
from engine.run import configfile
from engine.run.demo import make_leads
from tests.conftest import EXAMPLE_CONFIG
from tests.helpers import ROOT
from tests.helpers.harness import running

pytestmark = pytest.mark.slow

TENANT, TOKEN = "acme", "acme-demo-token"
# per operation and phase; LEADFLOW_SCHEMATHESIS_EXAMPLES=500 for a longer hunt
MAX_EXAMPLES = int(os.environ.get("LEADFLOW_SCHEMATHESIS_EXAMPLES", "100"))
HOOKS = ROOT / "tests" / "helpers" / "schemathesis_hooks.py"
CONFIG = ROOT / "tests" / "schemathesis.toml"  # negative_data_rejection: 413 is a refusal


def _data(cfg: config_mod.Config, seed: int, cards: list[str]) -> dict[str, object]:
    """What the hooks may use: the tenant's accounts, buyers, meters, leads, cards."""
    keys = {s.id: resolve_secret(s.key) for s in cfg.suppliers}
    leads = [{**lead, "lp_key": keys[lead["lp_supplier_id"]]}
             for lead in make_leads(random.Random(seed), 40)]
    tenant = next(t for t in cfg.tenants if t.id == TENANT)
    return {
        # one account of another tenant: a 404 a real client could meet
        "accounts": [WALLET, *(c.id for c in cfg.clients if c.tenant == TENANT),
                     "globex-buyer"],
        "buyers": [b.id for b in cfg.buyers if b.tenant == TENANT],
        "clients": [c.id for c in cfg.clients if c.tenant == TENANT],
        "meters": sorted(tenant.meters),
        "leads": leads,
        "reasons": sorted(RETURN_REASONS),
        "payment_methods": cards,
    }


@pytest.mark.timeout(400)
async def test_schemathesis_finds_no_5xx_and_no_mismatch(redis, redis_server, localstripe,
                                                          monkeypatch, tmp_path, seed):
    from bench.localstripe import API_KEY

    monkeypatch.setenv("LEADFLOW_STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("LEADFLOW_STRIPE_API_BASE", localstripe.url)
    cfg = configfile.load(EXAMPLE_CONFIG)
    cards = [localstripe.card() for _ in range(4)]
    data = tmp_path / "schemathesis-data.json"
    data.write_text(json.dumps(_data(cfg, seed, cards)))
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS),
           "LEADFLOW_SCHEMATHESIS_DATA": str(data), "NO_COLOR": "1"}
    async with running(cfg, redis_server.url, state_dir=tmp_path / "state") as eng:
        argv = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
            f"{eng.url}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--phases", "examples,coverage,fuzzing,stateful",
            "--seed", str(seed), "--max-examples", str(MAX_EXAMPLES),
            "--header", f"Authorization: Bearer {TOKEN}",
            "--workers", "1", "--generation-database", "none", "--no-color",
            "--request-timeout", "30",
        ]
        if os.environ.get("LEADFLOW_SCHEMATHESIS_HAR"):  # every request and response, to read
            argv += ["--report", "har", "--report-har-path",
                     os.environ["LEADFLOW_SCHEMATHESIS_HAR"]]
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        took = time.monotonic() - started
        report = out.decode(errors="replace")
        print(report)  # the run's own report, shown with -s and on a failure
        print(f"schemathesis: {took:.0f}s, exit {proc.returncode}")
        assert proc.returncode == 0, report[-6000:]
        # whatever it sent, every ledger sums to its balance and no floor is crossed
        await eng.assert_reconciled()
