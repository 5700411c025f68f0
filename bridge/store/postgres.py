"""PostgreSQL persistence (``KB_DATABASE_URL=postgresql://…``), through psycopg 3's async driver.

Reads share a pool of connections and run concurrently. Writes go through one connection of
their own, one at a time in the order they were called (an asyncio lock is FIFO): the same
ordering the SQLite backend's single thread gives, so a module that saves a row twice in a row
never finds the older save committed last. Each write commits before the call returns.

Migrations run under an advisory lock: two replicas starting at once apply each step once.

A lost connection (PostgreSQL restarted, a backend was terminated, the network cut) is never a
500 and never a lost acknowledged write:

- a pooled connection is checked for life before it is used, without a round trip: an idle
  connection the server has spoken on or hung up on is dead (a restart sends every client a
  FATAL goodbye), and so is every other one from before; the pool is drained and the call gets
  a fresh connection before any statement is sent;
- a connection that dies during a call is retried once on a fresh one where that is safe: a
  read, or a transaction whose COMMIT was not sent; a statement in autocommit (its own commit)
  may have committed, so it is not;
- otherwise, or when no connection can be had within ``ACQUIRE_TIMEOUT_S``, the call raises
  :class:`~bridge.errors.StoreUnavailable` (every dialect's 503, "retry shortly"); the writes
  queued behind a write that found no connection fail with it, not one timeout after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import StartupRefused, StoreUnavailable
from . import migrations
from .base import Row, Store

log = logging.getLogger(__name__)

# pg_advisory_lock key for migrations: any constant no other code uses ("kbschema").
MIGRATION_LOCK = 0x6B62736368656D61
# Readers per process; the writer is one more.
READ_POOL_MAX = 8
CONNECT_TIMEOUT_S = 10.0
# How long a call waits for a pooled connection before it answers "unavailable" (503): long
# enough to ride out a quick restart, short enough that a client is not left hanging.
ACQUIRE_TIMEOUT_S = 5.0
# psycopg_pool retries a failed connect with a doubling backoff (1, 2, 4… s) and a caller that
# waits meanwhile starts no attempt of its own: the database could be back for seconds before
# the pool tried again. So the pool gives up after one retry, and a waiting call asks again
# every slice (each ask starts an attempt when none is under way): a call connects within a
# slice of the database's return, and the first call after a restart succeeds.
RECONNECT_GIVE_UP_S = 0.5
ACQUIRE_SLICE_S = 0.5

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


class PostgresStore(Store):
    dialect = "postgres"
    now_sql = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"

    def __init__(self, url: str, steps: Sequence[migrations.Step] = migrations.STEPS,
                 *, read_pool_max: int = READ_POOL_MAX) -> None:
        self.url = url
        self._steps = tuple(steps)
        kwargs = {"autocommit": True}
        self._readers = AsyncConnectionPool(url, min_size=1, max_size=read_pool_max,
                                            kwargs=kwargs, open=False, name="kb-read",
                                            timeout=ACQUIRE_TIMEOUT_S,
                                            reconnect_timeout=RECONNECT_GIVE_UP_S)
        self._writer = AsyncConnectionPool(url, min_size=1, max_size=1, kwargs=kwargs,
                                           open=False, name="kb-write", timeout=ACQUIRE_TIMEOUT_S,
                                           reconnect_timeout=RECONNECT_GIVE_UP_S)
        self._write_lock = asyncio.Lock()
        # When the writer last found no connection (time.monotonic()): the writes that were
        # queued behind it meanwhile fail with it rather than each wait out a timeout in turn.
        self._writer_failed_at = float("-inf")

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
        async def statement(conn: Conn, progress: _Progress) -> int:
            progress.committing = True  # autocommit: the statement is its own commit
            cur = await conn.execute(to_pg(sql), _params(params))
            return max(cur.rowcount, 0)

        return await self._write(statement)

    async def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        if not statements:
            return

        async def block(conn: Conn, progress: _Progress) -> None:
            async with conn.transaction():
                for sql, params in statements:
                    await conn.execute(to_pg(sql), _params(params))
                progress.committing = True  # leaving the block sends COMMIT

        await self._write(block)

    async def _write(self, work: Callable[[Conn, _Progress], Awaitable[T]]) -> T:
        queued = time.monotonic()
        async with self._write_lock:
            # The write ahead found no connection while this one waited: one quick try (the
            # database may be back), not another whole timeout.
            timeout = ACQUIRE_SLICE_S if self._writer_failed_at > queued else ACQUIRE_TIMEOUT_S
            try:
                return await self._call(self._writer, work, timeout)
            except StoreUnavailable as exc:
                if isinstance(exc.__cause__, PoolTimeout):
                    self._writer_failed_at = time.monotonic()
                raise

    # -- reads: any pooled connection --------------------------------------------------------

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async def read(conn: Conn, _: _Progress) -> Row | None:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(to_pg(sql), _params(params))
                return await cur.fetchone()

        return await self._call(self._readers, read)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async def read(conn: Conn, _: _Progress) -> list[Row]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(to_pg(sql), _params(params))
                return await cur.fetchall()

        return await self._call(self._readers, read)

    # -- connections that may have died ------------------------------------------------------

    async def _call(self, pool: AsyncConnectionPool[Conn],
                    work: Callable[[Conn, _Progress], Awaitable[T]],
                    timeout: float = ACQUIRE_TIMEOUT_S) -> T:
        """``work`` on a live pooled connection; once more on a fresh one if the connection
        dies under it before anything could have committed; else StoreUnavailable."""
        for last_try in (False, True):
            progress = _Progress()
            conn: Conn | None = None
            try:
                async with self._connection(pool, timeout) as conn:
                    return await work(conn, progress)
            except PoolTimeout as exc:  # the pool already tried fresh connections meanwhile
                log.warning("database unavailable (%s): %s", pool.name, _first_line(exc))
                raise StoreUnavailable() from exc
            except psycopg.OperationalError as exc:
                if not connection_lost(exc, conn):
                    raise
                if last_try or progress.committing:
                    log.warning("database connection lost (%s)%s: %s", pool.name,
                                ", a write's outcome unknown" if progress.committing else "",
                                _first_line(exc))
                    raise StoreUnavailable() from exc
                log.info("database connection lost (%s), retrying on a fresh one: %s",
                         pool.name, _first_line(exc))
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _connection(self, pool: AsyncConnectionPool[Conn],
                          timeout: float) -> AsyncIterator[Conn]:
        deadline = time.monotonic() + timeout
        conn = await _getconn(pool, deadline)
        if not idle_alive(conn):
            # The server hung up on this one while it sat in the pool: a restart (or a failover)
            # ended every connection opened before it. Replace them all, not one per call.
            log.warning("database connection found closed in %s: reconnecting", pool.name)
            await pool.drain()
            await pool.putconn(conn)  # closed on return: it predates the drain
            conn = await _getconn(pool, deadline)
        try:
            yield conn
        finally:
            await pool.putconn(conn)


async def _getconn(pool: AsyncConnectionPool[Conn], deadline: float) -> Conn:
    """A pooled connection by ``deadline`` (time.monotonic()), asked for a slice at a time (see
    RECONNECT_GIVE_UP_S). Raises PoolTimeout."""
    while True:
        left = deadline - time.monotonic()
        try:
            return await pool.getconn(max(min(left, ACQUIRE_SLICE_S), 0.001))
        except PoolTimeout:
            if left <= ACQUIRE_SLICE_S:
                raise


class _Progress:
    """How far a call got: once ``committing`` is set, a lost connection leaves the write's
    outcome unknown, and running it again could apply it twice."""

    committing = False


def idle_alive(conn: Conn) -> bool:
    """Whether an idle connection (no query in flight) may still work, without a round trip.
    The server sends nothing unasked to an idle client of ours (no LISTEN), except the FATAL
    before it closes the connection, so anything readable (or the end of the stream) means
    dead. False positives only cost a reconnect."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def connection_lost(exc: BaseException, conn: Conn | None) -> bool:
    """Whether ``exc`` means the connection (not the statement) failed: the connection is now
    unusable, or PostgreSQL said so (class 08, or a shutdown's 57P01-57P03)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if conn is not None and (conn.broken or conn.closed):
        return True
    state = exc.sqlstate or ""
    return state.startswith("08") or state in ("57P01", "57P02", "57P03")


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
