"""Relative paths in a config file (``settings.state_dir``, a SQLite ``settings.sql_url``)
are relative to the file's directory, resolved once by ``engine.core.config.load``: every
command given the same file uses the same state, from whatever working directory.

They were relative to the working directory: from another directory, ``leadflow config
load`` said "no engine runs" next to the running engine, and ``leadflow reconcile`` started
a fresh embedded Redis in a new state dir and reported every account missing (a false
"problems found" for a cron job).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from engine.core.errors import ConfigError
from engine.run import configfile
from engine.store.embedded import free_port
from tests.conftest import EXAMPLE_CONFIG
from tests.integration.test_process import ROOT, Secrets, config_toml, lead, post

SETTINGS_ONLY = """
[settings]
{settings}

[[tenants]]
id = "t1"
api_token = "tok-t1"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.run.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_relative_paths_are_the_config_files_not_the_working_directorys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "leadflow"
    relative = write(conf / "relative.toml", SETTINGS_ONLY.format(
        settings='state_dir = "state"\nsql_url = "sqlite:///archive/ledger.sqlite3"'))
    default = write(conf / "default.toml", SETTINGS_ONLY.format(settings=""))
    bare = write(conf / "bare.toml", SETTINGS_ONLY.format(
        settings='sql_url = "ledger.sqlite3"'))
    absolute = write(conf / "absolute.toml", SETTINGS_ONLY.format(
        settings=f'state_dir = "{tmp_path / "abs"}"\nsql_url = "sqlite:///{tmp_path}/x.db"'))
    postgres = write(conf / "pg.toml", SETTINGS_ONLY.format(
        settings='sql_url = "postgresql://u@db/ledger"'))

    seen = []
    for cwd in (tmp_path / "a", tmp_path / "b" / "deeper"):
        cwd.mkdir(parents=True)
        monkeypatch.chdir(cwd)
        for path in (relative, default, bare, absolute, postgres):
            # the path as given on a command line: relative to the working directory
            rel = Path("../" * len(cwd.relative_to(tmp_path).parts)) / path.relative_to(
                tmp_path)
            for given in (path, rel):
                s = configfile.load(given).settings
                # what the state dir names from here
                seen.append((path.name, cwd / s.state_dir, s.sql_url))
    assert len(set(seen)) == 5, "both working directories, both spellings: the same paths"
    conf = conf.resolve()
    got = {name: (state, sql) for name, state, sql in seen}
    assert got["relative.toml"] == (conf / "state",
                                    f"sqlite:///{conf}/archive/ledger.sqlite3")
    assert got["default.toml"] == (conf / ".leadflow", None)
    assert got["bare.toml"] == (conf / ".leadflow", str(conf / "ledger.sqlite3"))
    assert got["absolute.toml"] == (tmp_path / "abs", f"sqlite:///{tmp_path}/x.db")
    assert got["pg.toml"][1] == "postgresql://u@db/ledger"
    # the README's `leadflow run` from the repo root: the example's state is config/.leadflow
    assert Path(configfile.load(EXAMPLE_CONFIG).settings.state_dir) == (
        EXAMPLE_CONFIG.parent / ".leadflow")


def test_state_left_where_the_old_rule_put_it_is_not_silently_abandoned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that ran from /srv with state_dir = ".leadflow" kept its embedded Redis in
    /srv/.leadflow. Resolved against the config file's directory, the same setting names an
    empty dir: an engine started there would start from empty state (every balance at its
    opening value). Every command refuses, naming both directories, until it is moved."""
    conf = write(tmp_path / "etc" / "leadflow.toml", SETTINGS_ONLY.format(settings=""))
    srv = tmp_path / "srv"
    (srv / ".leadflow" / "redis" / "appendonlydir").mkdir(parents=True)
    monkeypatch.chdir(srv)
    with pytest.raises(ConfigError) as err:
        configfile.load(conf)
    assert err.value.path == "settings.state_dir"
    assert str(tmp_path / "etc" / ".leadflow") in err.value.reason
    assert str(srv / ".leadflow") in err.value.reason
    assert cli(srv, "config", "check", str(conf)).returncode == 2
    # an absolute state_dir is unambiguous
    absolute = write(tmp_path / "etc" / "abs.toml", SETTINGS_ONLY.format(
        settings=f'state_dir = "{srv / ".leadflow"}"'))
    assert configfile.load(absolute).settings.state_dir == str(srv / ".leadflow")
    # moved next to the config file: found there
    (srv / ".leadflow").rename(tmp_path / "etc" / ".leadflow")
    assert configfile.load(conf).settings.state_dir == str(tmp_path / "etc" / ".leadflow")
    # state in both places: the config file's is the one
    (srv / ".leadflow" / "redis" / "appendonlydir").mkdir(parents=True)
    assert configfile.load(conf).settings.state_dir == str(tmp_path / "etc" / ".leadflow")


async def test_commands_run_elsewhere_find_the_engine_of_the_config_file(
        tmp_path: Path) -> None:
    """The engine started from one directory, on the embedded Redis with the relative state
    dir ".leadflow"; `config load` and `reconcile` run from another, as a cron job does."""
    s = Secrets()
    config = write(tmp_path / "conf" / "leadflow.toml", config_toml(Path(".leadflow"), s))
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.run.cli", "run", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port),
        cwd=here, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stderr is not None
    log: list[bytes] = []
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(30):  # its log line says it serves (no polling)
            while b"leadflow serving" not in (line := await process.stderr.readline()):
                assert line, b"".join(log).decode()  # it exited
                log.append(line)
        drain = asyncio.create_task(process.stderr.read())  # the pipe never fills
        async with aiohttp.ClientSession() as http:
            status, body = await post(http, f"http://127.0.0.1:{port}", lead(s, 1))
            assert (status, body["status"]) == (200, "ACCEPTED"), body

        loaded = await asyncio.to_thread(cli, there, "config", "load", str(config))
        assert loaded.returncode == 0, loaded.stderr
        assert f"config reloaded by the engine (pid {process.pid})" in loaded.stdout
        checked = await asyncio.to_thread(cli, there, "reconcile", "--config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "2 accounts checked, 0 problems" in checked.stdout
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0, (await drain).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if drain is not None:
            await drain
    assert (tmp_path / "conf" / ".leadflow" / "redis").is_dir()
    assert not (here / ".leadflow").exists() and not (there / ".leadflow").exists()
