"""The store contract, on SQLite here; tests/test_store_postgres.py runs the same class against
a real PostgreSQL. One SQL text, the same answers from both backends."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from bridge.errors import StartupRefused
from bridge.store import SqliteStore, Store, migrations, upsert
from bridge.store.postgres import redact, to_pg

MakeStore = Callable[[], Store]


def with_store(make: MakeStore, body: Callable[[Store], Awaitable[None]]) -> None:
    async def scenario() -> None:
        store = make()
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(scenario())


class StoreContract:
    """Every backend answers these the same way (subclasses give ``make_store``)."""

    def test_opens_at_the_latest_schema_and_reopens_as_a_no_op(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            assert await store.schema_version() == migrations.LATEST
            rows = await store.fetchall("SELECT version FROM schema_version ORDER BY version")
            assert [r["version"] for r in rows] == [s.version for s in migrations.STEPS]

        with_store(make_store, body)
        with_store(make_store, body)  # the second open applies nothing twice

    def test_execute_counts_changed_rows(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            for ak in ("a", "b", "c"):
                assert await store.execute(
                    "INSERT INTO keypairs (access_key, secret_key, secret_hash, concurrency,"
                    " created) VALUES (?, ?, ?, ?, ?)", (ak, "s" + ak, "h" + ak, 1, "t")) == 1
            assert await store.execute("UPDATE keypairs SET concurrency = 3"
                                       " WHERE access_key != ?", ("a",)) == 2
            assert await store.execute("DELETE FROM keypairs WHERE access_key = ?", ("zz",)) == 0
            row = await store.fetchone("SELECT COUNT(*) AS n, SUM(concurrency) AS c"
                                       " FROM keypairs")
            assert row == {"n": 3, "c": 7}
            assert await store.fetchone("SELECT * FROM keypairs WHERE access_key = ?",
                                        ("nobody",)) is None

        with_store(make_store, body)

    def test_a_failed_transaction_leaves_nothing(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            insert = ("INSERT INTO vfolders (id, name, owner, created) VALUES (?, ?, ?, ?)")
            with pytest.raises(Exception):  # noqa: B017 - each driver has its own IntegrityError
                await store.transaction([(insert, ("f1", "one", "ak", "t")),
                                         (insert, ("f2", "two", "ak", "t")),
                                         (insert, ("f1", "dup", "ak", "t"))])
            assert await store.fetchall("SELECT id FROM vfolders") == []
            await store.transaction([(insert, ("f1", "one", "ak", "t"))])
            await store.transaction([(insert, ("f2", "two", "ak", "t")),
                                     (insert, ("f3", "x", "ak", "t"))])
            rows = await store.fetchall("SELECT id FROM vfolders ORDER BY id")
            assert [r["id"] for r in rows] == ["f1", "f2", "f3"]

        with_store(make_store, body)

    def test_upsert_and_do_nothing(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            sql = upsert("vfolder_permissions", ["folder_id", "access_key", "permission"],
                         ["folder_id", "access_key"])
            await store.execute(sql, ("f", "ak", "ro"))
            await store.execute(sql, ("f", "ak", "rw"))
            rows = await store.fetchall("SELECT permission FROM vfolder_permissions")
            assert rows == [{"permission": "rw"}]
            ignored = await store.execute(
                "INSERT INTO vfolder_permissions (folder_id, access_key, permission)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING", ("f", "ak", "ro"))
            assert ignored == 0
            assert await store.fetchall("SELECT permission FROM vfolder_permissions") == rows

        with_store(make_store, body)

    def test_values_come_back_as_python_types(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            now = time.time()
            await store.execute(
                "INSERT INTO jobs (id, session_id, access_key, seq, code, stdin, environment,"
                " timeout, language, status, stdout, stderr, exit_code, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ("j", "s", "ak", 0, "print('?')", None, "{}", 30, "python", "queued",
                 "100% done", "", None, now))
            row = await store.fetchone("SELECT * FROM jobs WHERE id = ?", ("j",))
            assert row is not None
            # A Unix time keeps its milliseconds (PostgreSQL's REAL would not).
            assert abs(row["created_at"] - now) < 1e-3
            assert row["timeout"] == 30.0 and row["seq"] == 0 and row["stdin"] is None
            assert row["code"] == "print('?')" and row["stdout"] == "100% done"
            # A bool into an INTEGER column, as SQLite stores it.
            await store.execute("INSERT INTO event_streams (key, access_key, owner, created_at,"
                                " ended) VALUES (?, ?, ?, ?, ?)", ("run:x", "ak", "o", "t", True))
            row = await store.fetchone("SELECT ended FROM event_streams WHERE key LIKE 'run:%'"
                                       " AND owner = ?", ("o",))
            assert row == {"ended": 1}

        with_store(make_store, body)

    def test_question_marks_and_percents_in_literals_are_text(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            row = await store.fetchone("SELECT '?' AS q, 'it''s 5%' AS p, ? AS v -- why?\n",
                                       ("x",))
            assert row == {"q": "?", "p": "it's 5%", "v": "x"}

        with_store(make_store, body)

    def test_returning(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            row = await store.fetchone(
                "INSERT INTO vfolders (id, name, owner, created) VALUES (?, ?, ?, ?)"
                " RETURNING id, name", ("f", "n", "ak", "t"))
            assert row == {"id": "f", "name": "n"}

        with_store(make_store, body)

    def test_writes_land_in_call_order(self, make_store: MakeStore) -> None:
        """Saves of one row started back to back: the last one called is the one kept."""
        async def body(store: Store) -> None:
            sql = upsert("vfolder_permissions", ["folder_id", "access_key", "permission"],
                         ["folder_id", "access_key"])
            await asyncio.gather(*(store.execute(sql, ("f", "ak", f"p{i}")) for i in range(50)))
            row = await store.fetchone("SELECT permission FROM vfolder_permissions")
            assert row == {"permission": "p49"}

        with_store(make_store, body)

    # -- leases ---------------------------------------------------------------------------

    def test_a_lease_has_one_holder_until_it_expires(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            assert await store.try_lease("timer:x", "r1", 0.5)
            assert not await store.try_lease("timer:x", "r2", 0.5)
            assert await store.lease_holder("timer:x") == "r1"
            assert await store.try_lease("timer:x", "r1", 0.5)  # the holder extends it
            assert await store.renew("timer:x", "r1", 0.5)
            assert not await store.renew("timer:x", "r2", 0.5)
            await asyncio.sleep(0.7)
            assert await store.lease_holder("timer:x") is None
            assert not await store.renew("timer:x", "r1", 0.5)  # lapsed: r1 must stop
            assert await store.try_lease("timer:x", "r2", 5)
            assert await store.lease_holder("timer:x") == "r2"

        with_store(make_store, body)

    def test_release_frees_a_lease_only_for_its_holder(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            assert await store.try_lease("replica:a", "a", 30)
            assert await store.try_lease("replica:b", "b", 30)
            assert await store.try_lease("timer:t", "a", 30)
            assert await store.leases("replica:") == {"replica:a": "a", "replica:b": "b"}
            assert not await store.release("replica:a", "b")
            assert await store.release("replica:a", "a")
            assert await store.leases("replica:") == {"replica:b": "b"}
            assert await store.try_lease("replica:a", "c", 30)

        with_store(make_store, body)

    def test_racing_for_a_free_lease_one_wins(self, make_store: MakeStore) -> None:
        async def body(store: Store) -> None:
            for round_ in range(5):
                won = await asyncio.gather(*(store.try_lease(f"race:{round_}", f"h{i}", 30)
                                             for i in range(20)))
                assert sum(won) == 1
                assert await store.lease_holder(f"race:{round_}") == f"h{won.index(True)}"

        with_store(make_store, body)


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> MakeStore:
        return lambda: SqliteStore(tmp_path / "kernel-bridge.sqlite3")


# -- migrations on SQLite ---------------------------------------------------------------------

def test_steps_are_numbered_without_gaps() -> None:
    assert [s.version for s in migrations.STEPS] == list(range(1, len(migrations.STEPS) + 1))
    assert len(migrations.STEPS) == migrations.LATEST


def test_a_first_release_data_dir_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    """A first-release file has its tables and no schema_version: it comes up at the latest
    version with its keypairs and sessions intact."""
    path = tmp_path / "kernel-bridge.sqlite3"
    conn = sqlite3.connect(path)
    for ddl in migrations.FIRST_RELEASE.sql("sqlite"):
        conn.execute(ddl.replace("DOUBLE PRECISION", "REAL"))  # as the first release wrote it
    conn.execute("INSERT INTO keypairs (access_key, secret_key, secret_hash, concurrency,"
                 " created) VALUES ('AK', 'SK', 'H', 5, 't')")
    conn.commit()
    conn.close()

    async def body(store: Store) -> None:
        assert await store.schema_version() == migrations.LATEST
        row = await store.fetchone("SELECT access_key, concurrency FROM keypairs")
        assert row == {"access_key": "AK", "concurrency": 5}
        assert await store.try_lease("x", "me", 10)  # step 2's table is there

    with_store(lambda: SqliteStore(path), body)


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kernel-bridge.sqlite3"
    with_store(lambda: SqliteStore(path), lambda s: s.execute(
        "INSERT INTO schema_version (version, name, applied_at) VALUES (99, 'future', 't')"))
    with pytest.raises(StartupRefused, match="schema version 99 is newer"):
        with_store(lambda: SqliteStore(path), lambda s: asyncio.sleep(0))


def test_a_failed_step_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "kernel-bridge.sqlite3"
    bad = migrations.Step(migrations.LATEST + 1, "broken", (
        "CREATE TABLE half_done (x INTEGER)", "CREATE TABLE keypairs (x INTEGER)"))
    with pytest.raises(sqlite3.OperationalError):
        with_store(lambda: SqliteStore(path, (*migrations.STEPS, bad)), lambda s: asyncio.sleep(0))

    async def body(store: Store) -> None:
        assert await store.schema_version() == migrations.LATEST
        assert await store.fetchone("SELECT name FROM sqlite_master WHERE name = 'half_done'") \
            is None

    with_store(lambda: SqliteStore(path), body)


# -- the PostgreSQL backend's SQL text (no server needed) ---------------------------------

def test_placeholders_become_psycopg_ones_outside_literals() -> None:
    assert to_pg("SELECT * FROM t WHERE a = ? AND b = ?") == \
        "SELECT * FROM t WHERE a = %s AND b = %s"
    assert to_pg("SELECT '?', \"we?ird\" FROM t WHERE k LIKE 'run:%' AND x = ?") == \
        "SELECT '?', \"we?ird\" FROM t WHERE k LIKE 'run:%%' AND x = %s"
    assert to_pg("SELECT 'it''s ?', ? -- a ? here\n, ?") == \
        "SELECT 'it''s ?', %s -- a ? here\n, %s"
    assert to_pg("SELECT 10 % 3") == "SELECT 10 %% 3"


def test_a_url_is_logged_without_its_password() -> None:
    assert redact("postgresql://kb:s3cret@db:5432/kb") == "postgresql://kb:***@db:5432/kb"
    assert redact("postgresql://kb@db/kb") == "postgresql://kb@db/kb"


def test_a_replica_keeps_its_presence_while_it_runs(tmp_path: Path) -> None:
    """The lease that stands for the flock with PostgreSQL: renewed past its lifetime while the
    replica runs, listed to the others, and given back at its stop."""
    from bridge.datadir import ReplicaPresence

    async def body(store: Store) -> None:
        other = ReplicaPresence(store, ttl_s=0.3, replica_id="b")
        assert await other.start() == []
        me = ReplicaPresence(store, ttl_s=0.3, replica_id="a")
        assert await me.start() == ["b"]
        await asyncio.sleep(1.0)  # three lifetimes: only renewal keeps them
        assert await me.others() == ["b"] and await other.others() == ["a"]
        await other.stop()
        assert await me.others() == []
        await me.stop()
        assert await store.leases("replica:") == {}

    with_store(lambda: SqliteStore(tmp_path / "db.sqlite3"), body)
