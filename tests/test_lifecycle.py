"""Start-up and shutdown discipline: one owner per data dir, a busy port in one line, SIGTERM
drains running runs, a second signal stops at once."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from .jupyter_support import KernelSocket
from .support import ROOT, Server, free_port, run_server


def serve(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--data-dir",
         str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_second_server_on_a_data_dir_in_use_refuses_and_changes_nothing() -> None:
    # No pool: its refills would change the sessions dir while the test looks at it.
    with run_server(pool_python="0") as srv:
        c = srv.client()
        assert c.post("/session", json={"lang": "python", "name": "first"}).status_code == 201
        r = c.post("/session/first", json={"mode": "query", "code": "x = 41\nopen('f.txt', 'w').write('kept')", "runId": None})
        assert r.json()["result"]["status"] == "finished"

        r = c.post("/api/kernels", json={"name": "python3"},
                   headers={"Authorization": f"token {srv.secret_key}"})
        assert r.status_code == 201, r.text
        kernel_id = r.json()["id"]
        ws = KernelSocket(srv.url, kernel_id, srv.secret_key)
        assert ws.run("import os\npid = os.getpid()\nprint('up')")[0] == "up\n"
        before = _snapshot(srv.data_dir)

        started = time.monotonic()
        out = serve(srv.data_dir, free_port())
        assert out.returncode == 2
        assert time.monotonic() - started < 15
        lines = out.stderr.strip().splitlines()
        assert lines == [f"kernel-bridge: data dir {srv.data_dir} in use by pid {srv.process.pid}"]

        # The first server's session, variables and files are untouched.
        r = c.post("/session/first", json={"mode": "query", "code": "print(x + 1, open('f.txt').read())", "runId": None})
        assert r.json()["result"]["console"] == [["stdout", "42 kept\n"]]
        assert c.get("/session/first").status_code == 200
        # Its records, session dirs and kernels too: the same kernel process answers on the
        # connection opened before.
        assert _snapshot(srv.data_dir) == before
        assert ws.run("print(pid == os.getpid())")[0] == "True\n"
        ws.close()


def _snapshot(data_dir: Path) -> tuple[object, ...]:
    """The data dir as a second server could have changed it: session rows, kernel records,
    session dirs and their files."""
    with sqlite3.connect(data_dir / "kernel-bridge.sqlite3") as db:
        rows = db.execute("SELECT id, state, state_reason FROM sessions ORDER BY id").fetchall()
        records = db.execute("SELECT session_id, record FROM kernels ORDER BY 1").fetchall()
    files = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "sessions").rglob("*"))
    return rows, records, files


def test_busy_port_is_one_line(tmp_path: Path) -> None:
    with run_server() as srv:
        out = serve(tmp_path / "other", srv.port)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"kernel-bridge: cannot listen on 127.0.0.1:{srv.port}: the port is in use"]
    assert not (tmp_path / "other" / "kernel-bridge.sqlite3").exists()


def _run_status(data_dir: Path, run_id: str) -> str:
    with sqlite3.connect(data_dir / "kernel-bridge.sqlite3") as db:
        row = db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
    return str(row[0])


def _sleeping_run(srv: Server, seconds: float, run_id: str) -> None:
    """A run ``run_id`` in a new session "drain" that sleeps ``seconds``, still going."""
    c = srv.client()
    assert c.post("/session", json={"lang": "python", "name": "drain"}).status_code == 201
    r = c.post("/session/drain", json={"mode": "query", "runId": run_id,
                                       "code": f"import time; time.sleep({seconds})"})
    assert r.json()["result"]["status"] == "continued"


def test_sigterm_lets_a_running_run_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data, shutdown_grace_s="30", flush_interval="0.5") as srv:
        _sleeping_run(srv, 3, "slow")
        sent = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(timeout=30)
        took = time.monotonic() - sent
    assert srv.process.returncode == 0
    assert _run_status(data, "slow") == "finished"
    assert 1.5 < took < 25  # waited for the run (about 2.5 s left), not the whole grace


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data, shutdown_grace_s="60", flush_interval="0.5") as srv:
        _sleeping_run(srv, 120, "long")
        sent = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert srv.process.poll() is None  # draining
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(timeout=30)
        assert time.monotonic() - sent < 20
