"""PostgreSQL persistence (``KB_DATABASE_URL=postgresql://…``), through psycopg 3's async driver.

Reads share a pool of connections and run concurrently. Writes go through one connection of
their own, one at a time in the order they were called (an asyncio lock is FIFO): the same
ordering the SQLite backend's single thread gives, so a module that saves a row twice in a row
never finds the older save committed last. Each write commits before the call returns.

Migrations run under an advisory lock: two replicas starting at once apply each step once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import StartupRefused
from . import migrations
from .base import Row, Store

log = logging.getLogger(__name__)

# pg_advisory_lock key for migrations: any constant no other code uses ("kbschema").
MIGRATION_LOCK = 0x6B62736368656D61
# Readers per process; the writer is one more.
READ_POOL_MAX = 8
CONNECT_TIMEOUT_S = 10.0


class PostgresStore(Store):
    dialect = "postgres"
    now_sql = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"

    def __init__(self, url: str, steps: Sequence[migrations.Step] = migrations.STEPS,
                 *, read_pool_max: int = READ_POOL_MAX) -> None:
        self.url = url
        self._steps = tuple(steps)
        kwargs = {"autocommit": True}
        self._readers = AsyncConnectionPool(url, min_size=1, max_size=read_pool_max,
                                            kwargs=kwargs, open=False, name="kb-read")
        self._writer = AsyncConnectionPool(url, min_size=1, max_size=1, kwargs=kwargs,
                                           open=False, name="kb-write")
        self._write_lock = asyncio.Lock()

    def describe(self) -> str:
        return f"PostgreSQL {redact(self.url)}"

    async def open(self) -> None:
        try:
            await self._migrate()
            for pool in (self._writer, self._readers):
                await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            await self.close()
            raise StartupRefused(f"cannot reach the database {redact(self.url)}: "
                                 f"{_first_line(exc)}") from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._readers.close()
        await self._writer.close()

    async def _migrate(self) -> None:
        latest = self._steps[-1].version if self._steps else 0
        async with await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
            # Held for the whole run; a second replica waits here, then finds nothing to do.
            await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                await conn.execute(migrations.VERSION_TABLE)
                cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                row = await cur.fetchone()
                current = int(row[0]) if row else 0
                if current > latest:
                    raise StartupRefused(f"database schema version {current} is newer than "
                                         f"this server's ({latest}): run the newer release")
                for step in self._steps:
                    if step.version <= current:
                        continue
                    async with conn.transaction():  # DDL is transactional in PostgreSQL
                        for sql in step.sql("postgres"):
                            await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_version (version, name, applied_at) VALUES"
                            " (%s, %s, to_char(now() AT TIME ZONE 'UTC',"
                            " 'YYYY-MM-DD\"T\"HH24:MI:SS+00:00'))", (step.version, step.name))
                    log.info("database migrated to version %d: %s", step.version, step.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    # -- writes: one connection, in call order ---------------------------------------------

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._write_lock, self._writer.connection() as conn:
            cur = await conn.execute(to_pg(sql), _params(params))
            return max(cur.rowcount, 0)

    async def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        if not statements:
            return
        async with self._write_lock, self._writer.connection() as conn, conn.transaction():
            for sql, params in statements:
                await conn.execute(to_pg(sql), _params(params))

    # -- reads: any pooled connection --------------------------------------------------------

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self._readers.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(to_pg(sql), _params(params))
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._readers.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(to_pg(sql), _params(params))
            return await cur.fetchall()


def _params(params: Sequence[Any]) -> list[Any]:
    # Booleans live in INTEGER columns (as in SQLite); PostgreSQL will not store a bool there.
    return [int(p) if isinstance(p, bool) else p for p in params]


@functools.lru_cache(maxsize=1024)
def to_pg(sql: str) -> str:
    """``?`` placeholders → psycopg's ``%s``, and every literal ``%`` doubled (psycopg reads
    ``%`` anywhere as a placeholder's start). A ``?`` inside a quoted string or identifier, or a
    ``--`` comment, is text, not a placeholder."""
    out: list[str] = []
    quote = ""  # the quote character we are inside, or "" outside
    comment = False
    prev = ""
    for ch in sql:
        if ch == "%":
            out.append("%%")
        elif comment:
            comment = ch != "\n"
            out.append(ch)
        elif quote:
            if ch == quote:
                quote = ""  # '' inside a literal closes and reopens it: same result
            out.append(ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "-" and prev == "-":
            comment = True
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        else:
            out.append(ch)
        prev = ch
    return "".join(out)


def redact(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
