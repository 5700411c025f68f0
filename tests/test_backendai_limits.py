"""Keypair concurrency and idle reaping, each on a server with its own settings (issue 2)."""

from __future__ import annotations

import time
from pathlib import Path

from .support import console_text, run_server, run_to_end


def test_sixth_session_is_quota_exceeded() -> None:
    with run_server() as server, server.client() as client:
        names = [f"quota-{i}" for i in range(5)]
        for name in names:
            assert client.post("/session", json={"lang": "python", "name": name}).status_code == 201
        r = client.post("/session", json={"lang": "python", "name": "quota-5"})
        assert r.status_code == 412
        assert r.json()["type"].endswith("/quota-exceeded")
        assert client.get("/session/quota-5").status_code == 404  # nothing was created
        # reuse of an existing one is not a new session
        assert client.post("/session", json={"lang": "python", "name": "quota-0"}).status_code == 200
        assert client.delete("/session/quota-0").status_code == 200
        assert client.post("/session", json={"lang": "python", "name": "quota-5"}).status_code == 201


def test_idle_sessions_are_reaped() -> None:
    with run_server(idle_timeout_s="2", reaper_interval_s="0.2") as server, \
            server.client() as client:
        assert client.post("/session", json={"lang": "python", "name": "idle-1"}).status_code == 201
        assert client.get("/session/idle-1").json()["idleTimeout"] == 2000
        # a run that lasts longer than the idle timeout is activity, not idleness
        results = run_to_end(client, "/session", "idle-1", "import time\ntime.sleep(2.5)\nprint(1)")
        assert results[-1]["status"] == "finished"
        assert client.get("/session/idle-1").status_code == 200
        deadline = time.monotonic() + 8
        while client.get("/session/idle-1").status_code == 200:
            assert time.monotonic() < deadline, "idle session was not reaped"
            time.sleep(0.2)
        assert client.get("/session/idle-1").status_code == 404


def test_deactivated_keypair_gets_401_while_the_server_runs() -> None:
    import subprocess
    import sys

    from .support import ROOT

    with run_server() as server, server.client() as client:
        assert client.post("/session", json={"lang": "python", "name": "keep-1"}).status_code == 201
        out = subprocess.run([sys.executable, "-m", "api.cli", "keys", "deactivate",
                              server.access_key, "--data-dir", str(server.data_dir)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        assert "inactive" in out.stdout
        deadline = time.monotonic() + 10
        while client.get("/session/keep-1").status_code != 401:
            assert time.monotonic() < deadline, "the deactivation was not noticed"
            time.sleep(0.3)
        r = client.post("/session", json={"lang": "python", "name": "keep-2"})
        assert r.status_code == 401 and r.json()["type"].endswith("/auth-failed")
        subprocess.run([sys.executable, "-m", "api.cli", "keys", "activate", server.access_key,
                        "--data-dir", str(server.data_dir)], cwd=ROOT, check=True,
                       capture_output=True)
        deadline = time.monotonic() + 10
        while client.get("/session/keep-1").status_code != 200:  # its session ran on
            assert time.monotonic() < deadline, "the reactivation was not noticed"
            time.sleep(0.3)
        bad = subprocess.run([sys.executable, "-m", "api.cli", "keys", "deactivate", "AKIANOPE",
                              "--data-dir", str(server.data_dir)], cwd=ROOT,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "AKIANOPE" in bad.stderr


def test_a_killed_servers_session_keeps_its_files_at_the_next_start(tmp_path: Path) -> None:
    """Sessions outlive the server (issue 15): the next server re-adopts the session, its files
    in place; only dirs no session owns are swept (tests/test_disk.py)."""
    data = tmp_path / "data"
    with run_server(data_dir=data) as server, server.client() as client:
        client.post("/session", json={"lang": "python", "name": "left-behind"})
        run_to_end(client, "/session", "left-behind", "open('note.txt', 'w').write('x')")
        # (a pooled kernel brings its own dir, so find the file rather than name the dir)
        [note] = (data / "sessions").glob("*/note.txt")
        workdir = note.parent
        secret = server.secret_key  # the session's owner, still in the data dir's keypairs
        server.process.kill()  # no shutdown: nothing gets cleaned up
        server.process.wait()
    assert (workdir / "note.txt").exists()
    with run_server(data_dir=data) as server, server.client(secret) as client:
        assert (workdir / "note.txt").read_text() == "x"
        assert client.get("/session/left-behind").status_code == 200
        read = run_to_end(client, "/session", "left-behind", "print(open('note.txt').read())")
        assert console_text(read, "stdout") == "x\n", read
