"""The store contract (tests/unit/test_store.py) against a real PostgreSQL (tests/pg.py), and
what only PostgreSQL has: replicas migrating at once, leases raced from separate processes'
pools, an unreachable database at start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from bridge.errors import StartupRefused, StoreUnavailable
from bridge.store import Store, migrations
from bridge.store.postgres import ACQUIRE_TIMEOUT_S, PostgresStore

from .unit.test_store import MakeStore, StoreContract, with_store


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def make_store(self, pg_url: str) -> MakeStore:
        return lambda: PostgresStore(pg_url)


def test_replicas_starting_at_once_migrate_once(pg_url: str) -> None:
    """Four stores open the same empty database concurrently: each step is applied once (the
    advisory lock), and every one of them comes up at the latest version."""
    async def scenario() -> None:
        stores = [PostgresStore(pg_url) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            for s in stores:
                assert await s.schema_version() == migrations.LATEST
            rows = await stores[0].fetchall("SELECT version FROM schema_version")
            assert sorted(r["version"] for r in rows) == [s.version for s in migrations.STEPS]
        finally:
            await asyncio.gather(*(s.close() for s in stores))

    asyncio.run(scenario())


def test_leases_raced_by_separate_replicas_have_one_winner(pg_url: str) -> None:
    async def scenario() -> None:
        stores = [PostgresStore(pg_url) for _ in range(3)]
        for s in stores:
            await s.open()
        try:
            for round_ in range(10):
                won = await asyncio.gather(*(
                    s.try_lease(f"timer:{round_}", f"replica{i}", 30)
                    for i, s in enumerate(stores) for _ in range(3)))
                assert sum(won) == 3  # one replica won, and its three tries all hold it
                holder = await stores[0].lease_holder(f"timer:{round_}")
                assert holder in {"replica0", "replica1", "replica2"}
        finally:
            for s in stores:
                await s.close()

    asyncio.run(scenario())


def test_a_failed_step_is_rolled_back(pg_url: str) -> None:
    bad = migrations.Step(migrations.LATEST + 1, "broken", (
        "CREATE TABLE half_done (x INTEGER)", "CREATE TABLE keypairs (x INTEGER)"))
    with pytest.raises(psycopg.errors.DuplicateTable):
        with_store(lambda: PostgresStore(pg_url, (*migrations.STEPS, bad)),
                   lambda s: asyncio.sleep(0))

    async def body(store: Store) -> None:
        assert await store.schema_version() == migrations.LATEST
        assert await store.fetchone("SELECT to_regclass('half_done') AS t") == {"t": None}

    with_store(lambda: PostgresStore(pg_url), body)


def test_a_newer_database_is_refused(pg_url: str) -> None:
    with_store(lambda: PostgresStore(pg_url), lambda s: s.execute(
        "INSERT INTO schema_version (version, name, applied_at) VALUES (99, 'future', 't')"))
    with pytest.raises(StartupRefused, match="schema version 99 is newer"):
        with_store(lambda: PostgresStore(pg_url), lambda s: asyncio.sleep(0))


def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    from .support import free_port

    url = f"postgresql://kb:s3cret@127.0.0.1:{free_port()}/kb"
    with pytest.raises(StartupRefused) as info:
        with_store(lambda: PostgresStore(url), lambda s: asyncio.sleep(0))
    assert "cannot reach the database postgresql://kb:***@127.0.0.1" in str(info.value)
    assert "s3cret" not in str(info.value)


# A statement that ends its own connection the first time it runs (a sequence is not rolled
# back), as a PostgreSQL restart or a failover ends a connection in the middle of a call.
DIES_ONCE = ("SELECT CASE WHEN nextval('dies_once') = 1 THEN pg_terminate_backend(pg_backend_pid())"
             " ELSE true END AS ok")


def with_pg_store(pg_url: str, body: Callable[[PostgresStore], Awaitable[None]]) -> None:
    async def scenario() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            await store.execute("CREATE SEQUENCE dies_once")
            await body(store)
        finally:
            await store.close()

    asyncio.run(scenario())


def terminate_others(pg_url: str) -> int:
    """End every connection to the test's database but this one (an operator, a failover)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                           ).fetchone()
    return int(row[0]) if row else 0


def test_connections_ended_while_idle_are_replaced_before_a_statement_is_sent(
        pg_url: str) -> None:
    async def body(store: PostgresStore) -> None:
        await store.fetchall("SELECT 1")
        assert terminate_others(pg_url) >= 2  # the writer and a reader, idle in their pools
        await asyncio.sleep(0.2)  # their goodbyes have reached our sockets
        insert = "INSERT INTO vfolders (id, name, owner, created) VALUES (?, ?, ?, ?)"
        assert await store.execute(insert, ("f1", "one", "ak", "t")) == 1
        await store.transaction([(insert, ("f2", "two", "ak", "t"))])
        rows = await store.fetchall("SELECT id FROM vfolders ORDER BY id")
        assert [r["id"] for r in rows] == ["f1", "f2"]

    with_pg_store(pg_url, body)


def test_a_read_whose_connection_dies_is_retried_once_on_a_fresh_one(pg_url: str) -> None:
    async def body(store: PostgresStore) -> None:
        assert await store.fetchone(DIES_ONCE) == {"ok": True}
        assert await store.fetchone("SELECT last_value FROM dies_once") == {"last_value": 2}

    with_pg_store(pg_url, body)


def test_a_transaction_that_dies_before_its_commit_is_retried(pg_url: str) -> None:
    async def body(store: PostgresStore) -> None:
        insert = ("INSERT INTO vfolders (id, name, owner, created) VALUES (?, ?, ?, ?)",
                  ("f1", "one", "ak", "t"))
        await store.transaction([insert, (DIES_ONCE, ())])
        assert await store.fetchall("SELECT id FROM vfolders") == [{"id": "f1"}]  # once

    with_pg_store(pg_url, body)


def test_a_statement_that_dies_is_not_retried_and_says_unavailable(pg_url: str) -> None:
    """In autocommit a statement is its own commit: when its connection dies, it may have
    committed, so running it again could apply it twice. The caller gets StoreUnavailable
    (a 503, "retry shortly"), not an acknowledgement, and the store works on."""
    async def body(store: PostgresStore) -> None:
        with pytest.raises(StoreUnavailable, match="retry shortly"):
            await store.execute(DIES_ONCE)
        assert await store.fetchone("SELECT last_value FROM dies_once") == {"last_value": 1}
        assert await store.execute("UPDATE vfolders SET name = 'x'") == 0

    with_pg_store(pg_url, body)


def test_a_stopped_database_is_unavailable_within_the_acquire_timeout() -> None:
    from .pg import postgres_cluster

    async def scenario(url: str, stop: Callable[[], None]) -> None:
        store = PostgresStore(url)
        await store.open()
        try:
            stop()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.fetchone("SELECT 1")
            # Eight writes at once: they queue for the one writer, and all fail within about
            # one timeout, not eight in turn.
            writes = await asyncio.gather(*(store.execute("SELECT 1") for _ in range(8)),
                                          return_exceptions=True)
            assert all(isinstance(w, StoreUnavailable) for w in writes), writes
            assert time.monotonic() - started < 2 * ACQUIRE_TIMEOUT_S + 5
        finally:
            await store.close()

    with postgres_cluster() as cluster:
        asyncio.run(scenario(cluster.create_database(), cluster.stop))
