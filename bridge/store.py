"""SQLite persistence (WAL). One connection, owned by one worker thread, so the event loop
never blocks on disk and writes are serialised without locks of our own."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Row = dict[str, Any]

SCHEMA: list[str] = [
    """CREATE TABLE IF NOT EXISTS keypairs (
        access_key   TEXT PRIMARY KEY,
        secret_key   TEXT NOT NULL,
        secret_hash  TEXT NOT NULL UNIQUE,
        is_active    INTEGER NOT NULL DEFAULT 1,
        concurrency  INTEGER NOT NULL,
        total_queries INTEGER NOT NULL DEFAULT 0,
        created      TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sessions (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        access_key   TEXT NOT NULL,
        language     TEXT NOT NULL,
        origin       TEXT NOT NULL,
        state        TEXT NOT NULL,
        state_reason TEXT,
        config       TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        terminated_at TEXT,
        stats        TEXT)""",
    "CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (access_key, name)",
    """CREATE TABLE IF NOT EXISTS runs (
        id           TEXT PRIMARY KEY,
        session_id   TEXT NOT NULL,
        run_id       TEXT NOT NULL,
        mode         TEXT NOT NULL,
        code         TEXT NOT NULL,
        options      TEXT,
        status       TEXT NOT NULL,
        exit_code    INTEGER,
        created_at   TEXT NOT NULL,
        finished_at  TEXT)""",
    "CREATE INDEX IF NOT EXISTS runs_session ON runs (session_id, run_id)",
]


class Store:
    """Async facade over one SQLite file; every call runs on the store's own thread."""

    def __init__(self, path: Path, extra_schema: Iterable[str] = ()) -> None:
        self.path = path
        self._schema = [*SCHEMA, *extra_schema]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kb-store")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable across process crashes (not power loss), which
        # is what "persist before answering" needs, at a fraction of FULL's fsync cost.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        for ddl in self._schema:
            conn.execute(ddl)
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
        """Run one statement; returns the number of changed rows."""
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


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
