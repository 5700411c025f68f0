"""The real server with KB_DATABASE_URL against a throw-away PostgreSQL (tests/pg.py): every
dialect's state lands in PostgreSQL, not in the data dir, and outlives the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from bridge.store import migrations

from .support import ROOT, Client, Server, console_text, run_server, run_to_end
from .test_jobs import create, finished, submit, ts

EX = "/api/v1/execute"


def rows(url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def status(c: Client, execution_id: str) -> dict[str, Any]:
    r = c.get(f"{EX}/status/{execution_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture
def pg_server(pg_url: str) -> Iterator[Server]:
    with run_server(database_url=pg_url) as server:
        yield server


def test_backendai_session_lives_in_postgres(pg_server: Server, pg_url: str) -> None:
    assert not (pg_server.data_dir / "kernel-bridge.sqlite3").exists()
    name = "pg-" + uuid.uuid4().hex[:8]
    with pg_server.client() as c:
        r = c.post("/session", json={"lang": "python3", "name": name})
        assert r.status_code == 201, r.text
        sid = r.json()["sessionId"]
        (live,) = rows(pg_url, "SELECT name, state, access_key FROM sessions WHERE id = %s", sid)
        assert live["name"] == name and live["access_key"] == pg_server.access_key
        run_to_end(c, "/session", name, "x = 41")
        results = run_to_end(c, "/session", name, "print(x + 1)")
        assert console_text(results, "stdout") == "42\n"
        # The run's event stream is written to, and read back from, PostgreSQL.
        run_id = results[-1]["runId"]
        events = c.get(f"/session/{name}/runs/{run_id}/events", stream=True, timeout=30)
        assert events.status_code == 200, events.text
        text = events.text
        assert "event: stdout" in text and '"42\\n"' in text and "event: end" in text
        assert c.delete(f"/session/{name}").status_code == 200
    (gone,) = rows(pg_url, "SELECT state, terminated_at FROM sessions WHERE id = %s", sid)
    assert gone["state"] == "TERMINATED" and gone["terminated_at"]
    runs = rows(pg_url, "SELECT code, status FROM runs WHERE session_id = %s ORDER BY"
                        " created_at", sid)
    assert [r["code"] for r in runs] == ["x = 41", "print(x + 1)"]
    (kp,) = rows(pg_url, "SELECT total_queries FROM keypairs WHERE access_key = %s",
                 pg_server.access_key)
    assert kp["total_queries"] == 2


def test_sandbox_execute_and_a_job_on_postgres(pg_server: Server, pg_url: str) -> None:
    with pg_server.client() as c:
        r = c.post(EX, json={"code": "print(6 * 7)", "language": "python"})
        assert r.status_code == 200, r.text
        assert r.json()["stdout"] == "42\n" and r.json()["exit_code"] == 0
        r = c.post(EX + "/async", json={"code": "print('later')", "language": "python"})
        assert r.status_code == 200, r.text
        ex_id = r.json()["execution_id"]
        deadline = time.monotonic() + 30
        while (body := status(c, ex_id))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        assert body["status"] == "completed" and body["result"]["stdout"] == "later\n"
        (row,) = rows(pg_url, "SELECT status, result FROM executions WHERE id = %s", ex_id)
        assert row["status"] == "completed" and json.loads(row["result"])["stdout"] == "later\n"

        s = create(c, mode="dedicated", language="python")
        job = submit(c, s["id"], "import time\nprint(time.time() > 0)")
        done = finished(c, job["id"])
        assert done["status"] == "completed" and done["stdout"] == "True\n"
    (jrow,) = rows(pg_url, "SELECT status, stdout, created_at, session_id FROM jobs WHERE id = %s",
                   job["id"])
    assert jrow["status"] == "completed" and jrow["session_id"] == s["id"]
    assert abs(jrow["created_at"] - time.time()) < 120  # a Unix time, kept to the second
    (srow,) = rows(pg_url, "SELECT state, started_at FROM job_sessions WHERE id = %s", s["id"])
    assert srow["started_at"] == pytest.approx(ts(s["started_at"]), abs=1e-3)


def test_keys_create_writes_to_postgres_and_the_key_works(pg_server: Server, pg_url: str) -> None:
    """`keys create` with KB_DATABASE_URL, from another directory altogether: the key is in
    PostgreSQL, and the running server lets it in."""
    elsewhere = Path(tempfile.mkdtemp(prefix="kb-keys-"))
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--data-dir", str(elsewhere),
         "--json", "--concurrency", "3"], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "KB_DATABASE_URL": pg_url})
    kp = json.loads(out.stdout)
    assert not (elsewhere / "kernel-bridge.sqlite3").exists()
    (row,) = rows(pg_url, "SELECT concurrency, is_active FROM keypairs WHERE access_key = %s",
                  kp["access_key"])
    assert row == {"concurrency": 3, "is_active": 1}
    with Client(pg_server.url, kp["secret_key"]) as c:
        r = c.post(EX, json={"code": "print('new key')", "language": "python"})
        assert r.status_code == 200, r.text
        assert r.json()["stdout"] == "new key\n"
    with Client(pg_server.url, "not-a-key") as c:
        assert c.post(EX, json={"code": "1", "language": "python"}).status_code in (401, 403)


def test_state_outlives_the_server_and_its_data_dir(pg_url: str) -> None:
    """A second server on the same database, with another data dir, finds the first one's
    keypair and finished execution."""
    with run_server(database_url=pg_url) as first, first.client() as c:
        r = c.post(EX + "/async", json={"code": "print('kept')", "language": "python"})
        ex_id = r.json()["execution_id"]
        deadline = time.monotonic() + 30
        while status(c, ex_id)["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        secret = first.secret_key
    with run_server(database_url=pg_url) as second, Client(second.url, secret) as c:
        assert second.data_dir != first.data_dir
        body = status(c, ex_id)
        assert body["status"] == "completed" and body["result"]["stdout"] == "kept\n"


def test_a_second_replica_on_the_same_data_dir_starts(pg_url: str) -> None:
    """With PostgreSQL the data dir is shared storage: a second server on it is not refused
    (as it is with SQLite), and each sees the other in the replicas' leases."""
    with run_server(database_url=pg_url) as one:
        with run_server(one.data_dir, database_url=pg_url) as two:
            live = rows(pg_url, "SELECT holder FROM leases WHERE name LIKE 'replica:%%'"
                                " AND expires > EXTRACT(EPOCH FROM clock_timestamp())")
            assert len(live) == 2
            assert f"other live replicas: {live[0]['holder']}" in two.log() or \
                f"other live replicas: {live[1]['holder']}" in two.log()
            with two.client() as c:
                r = c.post(EX, json={"code": "print(2)", "language": "python"})
                assert r.status_code == 200 and r.json()["stdout"] == "2\n"
        # A replica that stops gives its lease back.
        assert len(rows(pg_url, "SELECT holder FROM leases WHERE name LIKE 'replica:%%'")) == 1


def test_doctor_checks_the_postgres_database(pg_url: str, tmp_path: Path) -> None:
    from .test_ops import kb, verdicts

    out = kb("doctor", "--data-dir", str(tmp_path / "d"), env={"KB_DATABASE_URL": pg_url})
    assert verdicts(out.stdout)["database"] == "OK", out.stdout
    assert "empty, the server will create its tables" in out.stdout
    with run_server(database_url=pg_url):
        pass
    out = kb("doctor", "--data-dir", str(tmp_path / "d"), env={"KB_DATABASE_URL": pg_url})
    assert verdicts(out.stdout)["database"] == "OK", out.stdout
    assert f"schema version {migrations.LATEST}, 1 keypair(s)" in out.stdout
    from .support import free_port

    gone = f"postgresql://kb:pw@127.0.0.1:{free_port()}/kb"
    out = kb("doctor", "--data-dir", str(tmp_path / "d"), env={"KB_DATABASE_URL": gone})
    assert out.returncode == 1 and verdicts(out.stdout)["database"] == "FAIL", out.stdout
    assert "fix: start PostgreSQL, or fix KB_DATABASE_URL" in out.stdout
    assert ":pw@" not in out.stdout


def test_a_database_restart_under_a_running_server() -> None:
    """PostgreSQL stops: /readyz says the store is unreachable (at once, not a hang), and a call
    that needs the database is every dialect's 503 "retry shortly", never a 500. It comes back:
    the very first call after it succeeds (the pooled connections the restart closed are
    replaced before a statement is sent), and every acknowledged execution is stored."""
    from .pg import postgres_cluster

    with postgres_cluster() as cluster:  # a cluster of its own: this test stops it
        url = cluster.create_database()
        with run_server(database_url=url) as server, server.client() as c:
            for i in range(3):  # several pooled connections, all from before the restart
                assert c.post(EX, json={"code": f"print({i})", "language": "python"}
                              ).status_code == 200
            for restart in range(2):
                cluster.stop()
                started = time.monotonic()
                r = c.get("/readyz")
                assert r.status_code == 503 and "store unreachable" in r.json()["checks"]["store"]
                assert time.monotonic() - started < 10
                r = c.post(EX, json={"code": "print('lost')", "language": "python"})
                assert r.status_code == 503, r.text
                assert r.json() == {"detail": "The server's database is unavailable right now; "
                                              "retry shortly."}
                r = c.get(f"/api/v1/jobs/{uuid.uuid4()}")  # the jobs dialect's shape
                assert r.status_code == 503, r.text
                assert r.json()["errors"][0]["code"] == "service_unavailable"
                assert "retry shortly" in r.json()["errors"][0]["message"]
                cluster.start()
                for i in range(3):  # the first call after the restart already succeeds
                    r = c.post(EX, json={"code": f"print('{restart}{i}')", "language": "python"})
                    assert r.status_code == 200, r.text
                    assert r.json()["stdout"] == f"{restart}{i}\n"
                assert c.get("/readyz").status_code == 200
            log = server.log()  # every failure was answered as such, none was a crash
            assert " 500 " not in log and "Uncaught exception" not in log, log[-5000:]
        stored = rows(url, "SELECT status, result FROM executions")
        assert {r["status"] for r in stored} == {"completed"}
        assert sorted(json.loads(r["result"])["stdout"] for r in stored) == [
            "0\n", "00\n", "01\n", "02\n", "1\n", "10\n", "11\n", "12\n", "2\n"]


def test_a_sqlite_data_dir_moves_to_postgres_with_its_keys_and_folders(pg_url: str,
                                                                       tmp_path: Path) -> None:
    """One server on SQLite, then `db import-sqlite` into PostgreSQL: the server started on
    PostgreSQL with the same data dir lets the old key in and lists its folder."""
    data_dir = tmp_path / "data"
    with run_server(data_dir) as old, old.client() as c:
        assert "database_url" not in old.env  # the first release's way: SQLite in the data dir
        assert c.post("/folders", json={"name": "kept"}).status_code == 201
        secret, access = old.secret_key, old.access_key
    source = data_dir / "kernel-bridge.sqlite3"
    env = {**os.environ, "KB_DATABASE_URL": pg_url}

    def import_sqlite(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", "db", "import-sqlite",
                               str(path)], capture_output=True, text=True, cwd=ROOT, env=env)

    out = import_sqlite(source)
    assert out.returncode == 0, out.stderr
    assert "keypairs: 1 copied of 1" in out.stdout and "vfolders: 1 copied of 1" in out.stdout
    assert "keypairs: 0 copied of 1" in import_sqlite(source).stdout  # kept as they are
    (row,) = rows(pg_url, "SELECT access_key FROM keypairs")
    assert row["access_key"] == access
    with run_server(data_dir, database_url=pg_url) as new, Client(new.url, secret) as c:
        r = c.get("/folders")
        assert r.status_code == 200, r.text
        assert [f["name"] for f in r.json()] == ["kept"]
    bad = import_sqlite(Path("/etc/hostname"))
    assert bad.returncode == 2 and "file is not a database" in bad.stderr
