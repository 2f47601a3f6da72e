"""Reading a config file: decode it into :mod:`engine.core.config`'s Structs, check every
cross-reference and rule (:mod:`engine.run.config_check`), make its relative paths absolute.
Any problem raises :class:`~engine.core.errors.ConfigError` naming the file, the path inside it
and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from engine.core.config import Config
from engine.core.constants import archive_path
from engine.core.errors import ConfigError
from engine.run.config_check import check


def load(path: str | os.PathLike[str]) -> Config:
    """Read, decode and check a config file.

    Relative paths in the file (``settings.state_dir``, and a SQLite ``settings.sql_url``)
    are relative to the file's directory, not to the working directory, and are made
    absolute here, once: every command given the same file (``run``, ``config load``,
    ``reconcile``, ``worker``) then uses the same state, wherever it is started from.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from exc
    cfg = loads(raw, source=source)
    # the directory the file is in, not the one a symlinked file points into: a file
    # replaced through a symlink (a Kubernetes ConfigMap's) keeps its state
    resolve_paths(cfg, Path(path).absolute().parent.resolve())
    return cfg


def resolve_paths(cfg: Config, base: Path) -> None:
    """Make ``cfg``'s relative file paths absolute against ``base`` (the config file's
    directory). A state dir named relative to the working directory, as leadflow used to
    resolve it, that holds an engine's data while the new place holds none is refused:
    starting there would start from empty state (balances at their opening values)."""
    s = cfg.settings
    state = Path(s.state_dir)
    if not state.is_absolute():
        s.state_dir = str(base / state)
        old = _in_cwd(state)
        if old is not None and _holds_state(old) and not _holds_state(Path(s.state_dir)):
            raise ConfigError(cfg.source, "settings.state_dir", (
                f"{str(state)!r} is relative to the config file's directory: "
                f"{s.state_dir}, which holds no engine state, while {old} (relative to the "
                "working directory, where leadflow looked before) does: move that "
                "directory there, or give state_dir as an absolute path"))
    if s.sql_url is not None:
        s.sql_url = _sqlite_url_at(s.sql_url, base)


def _in_cwd(path: Path) -> Path | None:
    try:
        return Path.cwd() / path
    except OSError:  # the working directory was removed
        return None


def _holds_state(state_dir: Path) -> bool:
    """An engine's data is there: the embedded Redis's AOF (or RDB), or the SQLite archive."""
    redis = state_dir / "redis"
    return any(p.exists() for p in (redis / "appendonlydir", redis / "appendonly.aof",
                                    redis / "dump.rdb", archive_path(state_dir)))


def _sqlite_url_at(url: str, base: Path) -> str:
    """A SQLite archive's relative file (``sqlite:///name``, ``sqlite://name`` or a bare
    path, as billing.archive.Archive.open reads them) made absolute against ``base``; any
    other URL (``postgresql://``) unchanged."""
    if url.startswith(("postgres://", "postgresql://")):
        return url
    path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    if not path or path == ":memory:" or Path(path).is_absolute():
        return url
    where = str(base / path)
    return "sqlite:///" + where if url.startswith("sqlite:") else where


def loads(raw: bytes | str, *, source: str = "<config>") -> Config:
    if isinstance(raw, bytes):
        # decoded here, not by the TOML parser: msgspec 0.23 reports invalid UTF-8 as a
        # DecodeError of its own, older versions let the UnicodeDecodeError through
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(source, "", f"not valid UTF-8: {exc.reason} at byte {exc.start}"
                              ) from exc
    try:
        cfg = msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.buyers[0].price`"; reshape to "path: reason"
        msg = str(exc)
        reason, _, where = msg.partition(" - at `$")
        raise ConfigError(source, where.rstrip("`").lstrip("."), reason) from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from exc
    except RecursionError as exc:  # the TOML parser recurses once per nested array/table
        raise ConfigError(source, "", "not valid TOML: nested too deeply") from exc
    cfg.source = source
    check(cfg)
    return cfg
