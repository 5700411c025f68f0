"""Sessions outlive the server (issue 15): a server killed with ``kill -9``, or stopped with
``--keep-kernels``, leaves every dialect's kernels running, and the next server on the data dir
re-adopts them with their state; a kernel that died meanwhile leaves its session in ERROR."""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jupyter_support import KernelSocket
from .support import Client, Server, console_text, run_server, run_to_end

EX = "/api/v1/execute"
JOBS = "/api/v1"


@dataclass
class Before:
    """What a client made on the first server, and its key to the second."""

    secret: str
    kernel_id: str
    sandbox_sid: str
    job_session: str
    jobs: list[str]  # [in flight at the stop, queued, queued]


def execute(c: Client, name: str, code: str, run_id: str | None = None) -> dict[str, Any]:
    r = c.post(f"/session/{name}", json={"mode": "query", "code": code, "runId": run_id})
    assert r.status_code == 200, r.text
    return dict(r.json()["result"])


def sandbox(c: Client, sid: str, code: str) -> dict[str, Any]:
    r = c.post(EX, json={"code": code, "language": "python", "session_id": sid})
    assert r.status_code == 200, r.text
    return dict(r.json())


def job(c: Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"{JOBS}/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_job(c: Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = job(c, job_id)
        if body["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def populate(srv: Server, in_flight_s: float) -> Before:
    """A session of each dialect with state in it, and work in flight or queued."""
    c = srv.client()
    assert c.post("/session", json={"lang": "python", "name": "keep"}).status_code == 201
    assert execute(c, "keep", "x = 41\nopen('f.txt', 'w').write('kept')")["status"] == "finished"
    assert c.post("/session", json={"lang": "python", "name": "busy"}).status_code == 201
    slow = execute(c, "busy", f"import time; time.sleep({in_flight_s}); print('slept')", "slow")
    assert slow["status"] == "continued"

    r = c.post("/api/kernels", json={"name": "python3"})
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    ws = KernelSocket(srv.url, kernel_id, srv.secret_key)
    assert ws.run("y = 'jupyter'\nprint(y)")[0] == "jupyter\n"
    ws.close()

    sid = "sb-" + uuid.uuid4().hex[:8]
    assert sandbox(c, sid, "z = 7")["exit_code"] == 0

    auth = srv.client()
    auth.headers.pop("X-API-Key")
    auth.headers["Authorization"] = f"Bearer {srv.secret_key}"
    r = auth.post(f"{JOBS}/sessions", json={"mode": "dedicated", "max_ttl": 600,
                                           "interactive_ttl": 600})
    assert r.status_code == 200, r.text
    js = r.json()["id"]
    first = auth.post(f"{JOBS}/sessions/{js}/jobs", json={"code": "order = ['kept']"}).json()
    assert wait_job(auth, first["id"])["status"] == "completed"
    jobs = [auth.post(f"{JOBS}/sessions/{js}/jobs", json={"code": code}).json()["id"]
            for code in (f"import time; time.sleep({in_flight_s}); order.append('slow')",
                         "order.append('second')", "order.append('third'); print(order)")]
    deadline = time.monotonic() + 30
    while job(auth, jobs[0])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [job(auth, j)["status"] for j in jobs] == ["running", "queued", "queued"]
    return Before(srv.secret_key, kernel_id, sid, js, jobs)


def check_adopted(srv: Server, before: Before) -> Client:
    """Every session of ``populate`` answers on ``srv`` with its state intact."""
    c = srv.client(before.secret)
    out = execute(c, "keep", "print(x + 1, open('f.txt').read())")
    assert out["status"] == "finished" and out["console"] == [["stdout", "42 kept\n"]], out
    assert c.get("/session/keep").status_code == 200

    ws = KernelSocket(srv.url, before.kernel_id, before.secret)
    assert ws.run("print(y)")[0] == "jupyter\n"
    ws.close()
    r = c.get(f"/api/kernels/{before.kernel_id}", headers={"Authorization":
                                                           f"token {before.secret}"})
    assert r.status_code == 200 and r.json()["execution_state"] != "dead", r.text
    assert r.json()["name"] == "python3"  # the name it was asked by: a saved notebook keeps it

    body = sandbox(c, before.sandbox_sid, "print(z * 6)")
    assert body["stdout"] == "42\n", body
    return c


def test_kill_9_then_restart_adopts_every_dialect(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data) as first:
        before = populate(first, in_flight_s=15)  # still running at the kill
        first.process.kill()
        first.process.wait()
    with run_server(data) as second:
        c = check_adopted(second, before)
        # The run in flight at the kill ends, with a reason, on its client's next call.
        cut = c.post("/session/busy", json={"mode": "continue", "code": "",
                                            "runId": "slow"}).json()["result"]
        assert cut["status"] == "finished" and cut["exitCode"] == 130, cut
        assert "server stopped before this run ended" in cut["console"][-1][1], cut
        # (It waits behind the cut run's code, which the kernel went on running.)
        after = run_to_end(c, "/session", "busy", "print('after')")
        assert console_text(after, "stdout") == "after\n", after
        # The job in flight failed with its reason (its kernel went on and finished it); the
        # queued ones ran after it, in order, in the same kernel (its state intact).
        jc = second.client(before.secret)
        lost, *queued = (wait_job(jc, j) for j in before.jobs)
        assert lost["status"] == "failed" and "restarted" in lost["stderr"], lost
        assert [j["status"] for j in queued] == ["completed", "completed"], queued
        assert queued[1]["stdout"] == "['kept', 'slow', 'second', 'third']\n", queued
        assert "server stopped" not in second.log()


def test_sigterm_with_keep_kernels_loses_no_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data, keep_kernels="true", shutdown_grace_s="60") as first:
        before = populate(first, in_flight_s=2)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=90) == 0
    with sqlite3.connect(data / "kernel-bridge.sqlite3") as db:
        status = db.execute("SELECT status FROM runs WHERE run_id='slow'").fetchone()[0]
    assert status == "finished"  # drained, not cut short
    with run_server(data) as second:  # (and its own stop then shuts the kernels down)
        c = check_adopted(second, before)
        # Nothing was lost: every job completed, in order, in the one kernel.
        jc = second.client(before.secret)
        done = [wait_job(jc, j) for j in before.jobs]
        assert [j["status"] for j in done] == ["completed"] * 3, done
        assert done[2]["stdout"] == "['kept', 'slow', 'second', 'third']\n", done
        # (It waits behind the cut run's code, which the kernel went on running.)
        after = run_to_end(c, "/session", "busy", "print('after')")
        assert console_text(after, "stdout") == "after\n", after


def test_a_kernel_that_died_while_the_server_was_down_leaves_error_not_404(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data) as first:
        c = first.client()
        secret = first.secret_key
        assert c.post("/session", json={"lang": "python", "name": "doomed"}).status_code == 201
        # The kernel ends itself 3 s from now, while no server is up.
        out = execute(c, "doomed", "import os, threading\n"
                                   "threading.Timer(3, lambda: os._exit(1)).start()")
        assert out["status"] == "finished"
        first.process.kill()
        first.process.wait()
    time.sleep(4)
    with run_server(data) as second:
        c = second.client(secret)
        r = c.get("/session/doomed")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ERROR", r.json()
        # The reason, where another dialect's sessions are shown with one (job sessions).
        ibm = second.client(secret)
        ibm.headers.pop("X-API-Key")
        ibm.headers["Authorization"] = f"Bearer {secret}"
        view = ibm.get(f"{JOBS}/sessions/doomed")
        assert view.status_code == 200, view.text
        assert view.json()["state_reason"].endswith(
            "its kernel is not running: kernel-died-while-server-down"), view.json()
        # A restart brings a kernel back into the same files.
        assert c.patch("/session/doomed").status_code == 204
        assert execute(c, "doomed", "print(1)")["console"] == [["stdout", "1\n"]]


def test_restart_with_50_idle_sessions_adopts_all(tmp_path: Path) -> None:
    data = tmp_path / "data"
    n = 50
    # 50 kernels within the host memory budget: a 256 MiB cap each.
    settings = {"pool_python": "0", "default_concurrency": "64", "default_mem_kib": "262144"}
    with run_server(data, **settings) as first:
        c = first.client()
        secret = first.secret_key
        for i in range(n):
            r = c.post("/session", json={"lang": "python", "name": f"sess{i}"})
            assert r.status_code == 201, r.text
            assert execute(c, f"sess{i}", f"v = {i}")["status"] == "finished"
        first.process.kill()
        first.process.wait()
    started = time.monotonic()
    with run_server(data, **settings) as second:
        ready = time.monotonic() - started
        c = second.client(secret)
        for i in range(n):
            assert execute(c, f"sess{i}", "print(v)")["console"] == [["stdout", f"{i}\n"]]
        line = next(x for x in second.log().splitlines() if "re-adopted" in x)
    print(f"\n50 idle sessions: ready {ready:.2f} s after start; {line}")
    assert f"re-adopted {n} session(s)" in line
