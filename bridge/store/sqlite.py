"""SQLite persistence (WAL), the embedded default. One connection, owned by one worker thread,
so the event loop never blocks on disk and writes are serialised without locks of our own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import StartupRefused
from . import migrations
from .base import Row, Store


class SqliteStore(Store):
    """Async facade over one SQLite file; every call runs on the store's own thread."""

    dialect = "sqlite"
    # julianday is a REAL with sub-millisecond precision (unixepoch('subsec') needs 3.42).
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path, steps: Sequence[migrations.Step] = migrations.STEPS) -> None:
        self.path = path
        self._steps = tuple(steps)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-store")
        self._conn: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"SQLite {self.path}"

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode is durable across process crashes (not power loss), which
            # is what "persist before answering" needs, at a fraction of FULL's fsync cost.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            migrate(conn, self._steps)
        except BaseException:
            conn.close()
            raise
        self.path.chmod(0o600)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("Store is not open")
        return self._conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(await self._call(lambda: self._db().execute(sql, params).rowcount))

    async def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Several statements, atomically, in one trip to the store's thread."""
        def fn() -> None:
            db = self._db()
            with db:  # BEGIN … COMMIT, or ROLLBACK on error
                db.execute("BEGIN")
                for sql, params in statements:
                    db.execute(sql, params)

        await self._call(fn)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        def fn() -> Row | None:
            row = self._db().execute(sql, params).fetchone()
            return dict(row) if row is not None else None

        result: Row | None = await self._call(fn)
        return result

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        def fn() -> list[Row]:
            return [dict(r) for r in self._db().execute(sql, params).fetchall()]

        result: list[Row] = await self._call(fn)
        return result


def migrate(conn: sqlite3.Connection, steps: Sequence[migrations.Step]) -> None:
    """Apply the steps ``conn``'s database lacks, each in a transaction with its version row.

    ``BEGIN IMMEDIATE`` takes the write lock before reading the version, so a ``keys create``
    opening the file while the server starts never applies a step twice.
    """
    conn.execute(migrations.VERSION_TABLE)
    latest = steps[-1].version if steps else 0
    for step in steps:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version"
                                      ).fetchone()
            if current > latest:
                raise StartupRefused(f"database schema version {current} is newer than this "
                                     f"server's ({latest}): run the newer release")
            if current < step.version:
                for sql in step.sql("sqlite"):
                    conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES"
                             " (?, ?, ?)", (step.version, step.name, _now()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
