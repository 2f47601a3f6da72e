"""SQL: one small backend interface over SQLite (the default) and PostgreSQL.

The ledger archive (billing.archive) and the identity store (engine.identity) both reach SQL
through it: :func:`open_backend` picks the backend by URL (``postgresql://...`` ->
PostgreSQL through psycopg 3; ``sqlite:///file``, or no URL, -> a SQLite file), and every
value is a bound parameter (``ph`` is the backend's placeholder: ``?`` or ``%s``).

SQLite runs in a worker thread (stdlib ``sqlite3``, one connection, WAL); PostgreSQL is one
async connection. Each serializes its own statements; several backends may be open on one
database (the API's, the ledger worker's): SQLite waits up to 5 s for another connection's
write (``sqlite3``'s default busy timeout).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

Row = tuple[Any, ...]


class Step(NamedTuple):
    """One statement of :meth:`Backend.batch`; ``need``: it must change at least one row,
    else the whole batch is rolled back (:class:`NoRows`)."""

    sql: str
    params: Sequence[Any] = ()
    need: bool = False


def time_range(ph: str, from_ms: int | None, to_ms: int | None, where: list[str],
               params: list[Any]) -> None:
    """``ts >= from_ms`` and ``ts < to_ms`` (each only when given) added to a query's
    conditions and parameters (``ph``: the backend's placeholder)."""
    if from_ms is not None:
        where.append(f"ts >= {ph}")
        params.append(from_ms)
    if to_ms is not None:
        where.append(f"ts < {ph}")
        params.append(to_ms)


class NoRows(Exception):
    """A step marked ``need`` changed no row: nothing of the batch was kept."""

    def __init__(self, step: int) -> None:
        super().__init__(f"step {step} changed no row")
        self.step = step


class Backend(Protocol):
    ph: str

    async def script(self, sql: str) -> None: ...
    async def insert(self, sql: str, rows: Sequence[Row]) -> None: ...
    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]: ...
    async def batch(self, steps: Sequence[Step]) -> list[int]: ...
    async def close(self) -> None: ...


class Sqlite:
    ph = "?"

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()

    def _script(self, sql: str) -> None:
        with self._lock:
            self._conn.executescript(sql)

    def _insert(self, sql: str, rows: Sequence[Row]) -> None:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(sql, rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def _batch(self, steps: Sequence[Step]) -> list[int]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # the write lock first: no upgrade deadlock
            counts: list[int] = []
            try:
                for i, step in enumerate(steps):
                    n = self._conn.execute(step.sql, step.params).rowcount
                    if step.need and n < 1:
                        raise NoRows(i)
                    counts.append(n)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return counts

    async def script(self, sql: str) -> None:
        await asyncio.to_thread(self._script, sql)

    async def insert(self, sql: str, rows: Sequence[Row]) -> None:
        await asyncio.to_thread(self._insert, sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return await asyncio.to_thread(self._fetch, sql, params)

    async def batch(self, steps: Sequence[Step]) -> list[int]:
        """The steps in one transaction: each one's count of rows changed."""
        return await asyncio.to_thread(self._batch, steps)

    async def close(self) -> None:
        with self._lock:
            self._conn.close()


class Postgres:
    ph = "%s"

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, url: str) -> Postgres:
        import psycopg  # noqa: PLC0415 - PostgreSQL's driver, loaded only for a postgresql:// URL

        return cls(await psycopg.AsyncConnection.connect(url))

    async def script(self, sql: str) -> None:
        async with self._lock, self._conn.transaction():
            for stmt in (s.strip() for s in sql.split(";")):
                if stmt and not all(ln.startswith("--") for ln in stmt.splitlines()):
                    await self._conn.execute(stmt)

    async def insert(self, sql: str, rows: Sequence[Row]) -> None:
        async with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            await cur.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        async with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            await cur.execute(sql, params)
            return list(await cur.fetchall()) if cur.description is not None else []

    async def batch(self, steps: Sequence[Step]) -> list[int]:
        """The steps in one transaction: each one's count of rows changed."""
        counts: list[int] = []
        async with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            # NoRows raised inside the block rolls the transaction back, then propagates
            for i, step in enumerate(steps):
                await cur.execute(step.sql, step.params)
                if step.need and cur.rowcount < 1:
                    raise NoRows(i)
                counts.append(cur.rowcount)
        return counts

    async def close(self) -> None:
        await self._conn.close()


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgres://", "postgresql://"))


async def open_backend(url: str | None, path: str | Path) -> Backend:
    """``postgresql://...`` -> PostgreSQL; ``sqlite:///file`` -> that SQLite file; None ->
    the SQLite file ``path``."""
    if url and is_postgres(url):
        return await Postgres.connect(url)
    if url:
        path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    return await asyncio.to_thread(Sqlite, str(path))
