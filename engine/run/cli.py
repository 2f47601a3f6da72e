"""The ``leadflow`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import uvloop

from billing.archive import Archive
from engine.core import config as config_mod
from engine.core.constants import archive_path
from engine.core.errors import ConfigError, EmbeddedRedisError, LeadflowError
from engine.obs.logs import setup_logging
from engine.run import configfile
from engine.run.demo import run_demo
from engine.run.pidfile import EngineState, config_path, read_running
from engine.run.reconcile import reconcile
from engine.run.service import Service, redis_url_from, run_worker
from engine.run.wallet import credit_wallet
from engine.run.workers import REGISTRY, in_process_workers
from engine.store.embedded import EmbeddedRedis
from engine.store.store import Store, connect

DEFAULT_CONFIG = "config/example.toml"


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=os.environ.get("LEADFLOW_CONFIG", DEFAULT_CONFIG),
        help="config file (TOML); default $LEADFLOW_CONFIG or config/example.toml",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis URL; default $LEADFLOW_REDIS_URL, else an embedded redis-server",
    )


def _parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="leadflow", description="lead routing and metering engine")
    sub = root.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the HTTP API and run the workers until SIGTERM")
    _config_arg(run)
    run.add_argument("--host", default=None)
    run.add_argument("--port", type=int, default=None)

    demo = sub.add_parser("demo", help="post generated leads through the real API, then reconcile")
    _config_arg(demo)
    demo.add_argument("--leads", type=int, default=2_000)
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--no-sink", dest="sink", action="store_false",
                      help="no local buyer webhook sink (sold leads are not delivered)")
    demo.add_argument("--hold", action="store_true",
                      help="keep serving after the run (open the buyer portal) until Ctrl-C")

    cfg = sub.add_parser("config", help="check or load a config file")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file")
    check.add_argument("path")
    load = cfg_sub.add_parser("load", help="validate, then make the running engine reload it")
    load.add_argument("path")
    load.add_argument("--state-dir", default=None, help="where the running engine's pid file is")

    rec = sub.add_parser(
        "reconcile", help="check that every ledger sums to its balance",
        description="Check every account: its ledger sums to its balance, the balance is not "
                    "below its floor, every account of the config is in Redis.",
        epilog="exit status: 0 every check passed, 1 problems found (one FAIL line each), "
               "2 could not check (Redis or the SQL archive unreachable, config or usage "
               "error)")
    _config_arg(rec)

    wallet = sub.add_parser(
        "wallet", help="the platform operator's side of a tenant's platform-fee wallet")
    wallet_sub = wallet.add_subparsers(dest="action", required=True)
    credit = wallet_sub.add_parser(
        "credit", help="credit a tenant's platform wallet (a payment the platform received)",
        description="Credit a tenant's platform-fee wallet with a payment the platform "
                    "received outside leadflow (a wire, a check): one ledger entry (kind "
                    "funding, process operator), idempotent on --ref.",
        epilog="exit status: 0 credited (or already credited with this --ref), 1 refused, "
               "nothing moved (unknown tenant, an amount that is not positive, closed "
               "wallet, balance limit, --ref used for another amount), 2 could not run "
               "(Redis unreachable, config or usage error)")
    credit.add_argument("tenant")
    credit.add_argument("amount", help='decimal dollars, e.g. "250.00"')
    credit.add_argument("--ref", required=True,
                        help="the payment's reference (1-100 characters): a second credit "
                             "with it moves nothing")
    credit.add_argument("--note", default="", help="free text for the ledger entry")
    _config_arg(credit)

    worker = sub.add_parser("worker", help="run one worker process")
    worker.add_argument("kind", choices=list(REGISTRY))
    _config_arg(worker)
    worker.add_argument("--consumer", default=None, help="consumer name (default host-pid)")
    worker.add_argument("--metrics-port", type=int, default=None)
    return root


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except LeadflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        cfg = configfile.load(args.path)
        if args.action == "check":
            print(
                f"{args.path}: ok ({len(cfg.tenants)} tenants, {len(cfg.campaigns)} campaigns, "
                f"{len(cfg.buyers)} buyers, {len(cfg.suppliers)} suppliers)"
            )
            return 0
        return _signal_reload(cfg, args.state_dir)
    cfg = configfile.load(args.config)
    if args.command == "run":
        svc = Service(
            cfg,
            redis_url=args.redis_url,
            host=args.host,
            port=args.port,
            workers=_default_workers(),
        )
        _run(_serve(svc))
        return 0
    if args.command == "demo":
        return _run(run_demo(cfg, leads=args.leads, seed=args.seed, redis_url=args.redis_url,
                             sink=args.sink, hold=args.hold))
    if args.command == "reconcile":
        return _run(_reconcile(cfg, args.redis_url))
    if args.command == "wallet":
        return _run(_wallet_credit(cfg, args))
    return _run(
        run_worker(
            args.kind,
            cfg,
            redis_url=args.redis_url,
            consumer=args.consumer,
            metrics_port=args.metrics_port,
        )
    )


def _default_workers() -> list[Any]:
    return in_process_workers()


async def _serve(svc: Any) -> int:
    await svc.run_until_signal()
    return 0


async def _open_archive(cfg: config_mod.Config) -> Any:
    """The ledger worker's SQL archive, when there is one (``sql_url`` or the SQLite file)."""
    sqlite = archive_path(cfg.settings.state_dir)
    if cfg.settings.sql_url is None and not sqlite.exists():
        return None
    return await Archive.open(cfg.settings.sql_url, path=str(sqlite))


def _signal_reload(cfg: config_mod.Config, state_dir: str | None, *,
                   within_s: float = 30.0) -> int:
    """SIGHUP to every engine running on the config's state dir, once the file checked out,
    then wait for each engine's own verdict (its record, engine.run.pidfile). An engine reloads
    the file it was started with, so another file is refused rather than silently ignored."""
    where = Path(state_dir or cfg.settings.state_dir)
    engines = read_running(where)
    if not engines:
        print(f"config ok, but no engine runs on state dir {where}", file=sys.stderr)
        return 1
    mine = config_path(cfg.source)
    for e in engines:
        if e.config != mine:
            print(f"config ok, but the engine (pid {e.pid}) reloads {e.config}, not this "
                  "file: edit that one, or restart the engine with --config", file=sys.stderr)
            return 1
    return max(_reload_one(where, e.pid, e.reloads, within_s) for e in engines)


def _reload_one(where: Path, pid: int, reloads: int, within_s: float) -> int:
    def now() -> EngineState | None:
        return next((e for e in read_running(where) if e.pid == pid), None)

    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:  # gone meanwhile, or another user's process
        print(f"could not signal the engine (pid {pid}): {exc.strerror}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + within_s
    while (state := now()) is not None and state.reloads <= reloads:
        if time.monotonic() > deadline:
            print(f"reload signalled to pid {pid}; no answer within {within_s:.0f}s",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)  # poll interval
    if state is None:
        print(f"the engine (pid {pid}) stopped", file=sys.stderr)
        return 1
    if state.reload_error:
        print(f"reload refused by the engine (pid {pid}): {state.reload_error}",
              file=sys.stderr)
        return 1
    print(f"config reloaded by the engine (pid {pid})")
    return 0


async def _reconcile(cfg: config_mod.Config, redis_url: str | None) -> int:
    """Exit 0: every check passed; 1: problems found; 2: no verdict, because what is
    checked could not be read (config and usage errors exit 2 as well)."""
    return await _at_redis(cfg, redis_url, "reconcile: could not check",
                           lambda url: _reconcile_at(cfg, url))


async def _wallet_credit(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    async def at(url: str) -> int:
        store = Store(connect(url))
        try:
            outcome = await credit_wallet(cfg, store, args.tenant, args.amount, ref=args.ref,
                                          note=args.note)
        finally:
            await store.redis.aclose()
        print(outcome.message, file=sys.stdout if outcome.ok else sys.stderr)
        return 0 if outcome.ok else 1

    return await _at_redis(cfg, args.redis_url, "wallet credit: could not run", at)


async def _at_redis(cfg: config_mod.Config, redis_url: str | None, failed: str,
                    fn: Callable[[str], Awaitable[int]]) -> int:
    """``fn`` on the Redis of the config: the URL given, or, with none, the embedded
    default's data under the state dir. While an engine runs there, the redis-server it
    started is used (a second server on the same AOF files would read a stale copy of
    them); otherwise one is started on the data and stopped after. Anything that keeps
    ``fn`` from running or finishing is one line on stderr (URLs and passwords left out)
    and exit status 2."""
    url = redis_url_from(cfg, redis_url)
    try:
        if url is not None:
            return await fn(url)
        state_dir = Path(cfg.settings.state_dir)
        engines = read_running(state_dir)
        embedded = next((e.redis_url for e in engines if e.redis_url), None)
        if embedded is not None:
            return await fn(embedded)
        if engines:
            print(f"{failed}: the engine (pid {engines[0].pid}) running on state dir "
                  f"{state_dir} has no embedded Redis (it is starting, or was given a Redis "
                  "URL): pass --redis-url", file=sys.stderr)
            return 2
        with EmbeddedRedis(state_dir / "redis") as server:
            return await fn(server.url)
    except Exception as exc:  # noqa: BLE001 - never exit 1 (a verdict) without one
        print(f"{failed}: {_unchecked(exc, url, cfg.settings.sql_url)}", file=sys.stderr)
        return 2


def _unchecked(exc: Exception, *urls: str | None) -> str:
    """One line naming what failed, without the URLs' passwords."""
    module = type(exc).__module__
    if module.startswith("redis"):
        what = "Redis"
    elif module.startswith(("sqlite3", "psycopg")):
        what = "SQL archive"
    elif isinstance(exc, EmbeddedRedisError):
        what = "embedded Redis"
    else:
        what = "unexpected error"
        logging.getLogger("leadflow").error("command failed", exc_info=exc)
    text = " ".join(f"{what}: {type(exc).__name__}: {exc}".split())
    for url in urls:
        if url:
            text = text.replace(url, "<url>")
            try:
                password = urlsplit(url).password
            except ValueError:
                password = None
            for secret in {password, unquote(password or "")} - {None, ""}:
                text = text.replace(str(secret), "***")
    return text


async def _reconcile_at(cfg: config_mod.Config, url: str) -> int:
    store = Store(connect(url))
    archive = None
    try:
        archive = await _open_archive(cfg)
        checks, findings = await reconcile(cfg, store, archive)
    finally:
        await store.redis.aclose()
        if archive is not None:
            await archive.close()
    for f in findings:
        print(f"FAIL {f.tenant}/{f.account}: {f.problem}")
    others = sorted({c.tenant for c in checks if not c.configured})
    if others:
        print(f"reconcile: tenants not in the config, checked too: {', '.join(others)}")
    print(f"reconcile: {len(checks)} accounts checked, {len(findings)} problems")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
