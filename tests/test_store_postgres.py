"""The store contract (tests/unit/test_store.py) against a real PostgreSQL (tests/pg.py), and
what only PostgreSQL has: replicas migrating at once, leases raced from separate processes'
pools, an unreachable database at start."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from bridge.errors import StartupRefused
from bridge.store import Store, migrations
from bridge.store.postgres import PostgresStore

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
