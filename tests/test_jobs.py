"""Job sessions (IBM Qiskit Runtime style, seed 004) through the real server (issue 6).

TTLs are a few seconds so every transition happens while the test watches.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from .support import Client, Server, run_server, run_to_end

API = "/api/v1"
SESSION_FIELDS = {"id", "backend_name", "started_at", "activated_at", "closed_at",
                  "last_job_started", "last_job_completed", "interactive_ttl", "max_ttl",
                  "active_ttl", "state", "state_reason", "accepting_jobs", "mode", "timestamps",
                  "user_id", "elapsed_time"}


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def wait_for(fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool],
             timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = fetch()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def session_of(c: Client, sid: str) -> dict[str, Any]:
    r = c.get(f"{API}/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def job_of(c: Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"{API}/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def finished(c: Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    job = wait_for(lambda: job_of(c, job_id),
                   lambda j: j["status"] in ("completed", "failed", "cancelled"), timeout)
    assert job["status"] in ("completed", "failed", "cancelled"), job
    return job


def create(c: Client, **body: Any) -> dict[str, Any]:
    r = c.post(f"{API}/sessions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def submit(c: Client, sid: str, code: str, **body: Any) -> dict[str, Any]:
    r = c.post(f"{API}/sessions/{sid}/jobs", json={"code": code, **body})
    assert r.status_code == 200, r.text
    return r.json()


def statuses(s: dict[str, Any]) -> list[str]:
    return [t["status"] for t in s["timestamps"]]


def assert_ibm_error(r: requests.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"errors", "trace"} and body["trace"]
    err = body["errors"][0]
    assert set(err) == {"code", "message", "more_info"} and err["message"]
    if code is not None:
        assert err["code"] == code, body


@pytest.fixture
def fresh(server: Server) -> Iterator[tuple[Client, str]]:
    """A client on a keypair of its own, so listings hold only this test's sessions."""
    access, secret = server.new_keypair()
    with server.client(secret) as c:
        yield c, access


def test_dedicated_lifecycle_every_timer(client: Client, server: Server) -> None:
    """open → active → inactive → active → inactive → closed (max_ttl), state kept."""
    s = create(client, mode="dedicated", max_ttl=10, interactive_ttl=2)
    assert set(s) >= SESSION_FIELDS
    assert s["state"] == "open" and statuses(s) == ["open"] and s["accepting_jobs"] is True
    assert s["mode"] == "dedicated" and s["max_ttl"] == 10 and s["interactive_ttl"] == 2
    assert s["active_ttl"] == 10 and s["activated_at"] is None and s["elapsed_time"] == 0
    assert s["user_id"] == server.access_key and s["backend_name"] == "kernel-bridge"
    sid = s["id"]

    job = finished(client, submit(client, sid, "import time\nx = 41\ntime.sleep(1)\n"
                                               "print('hi')")["id"])
    assert job["status"] == "completed" and job["stdout"] == "hi\n" and job["exit_code"] == 0
    assert job["session_id"] == sid and job["language"] == "python"
    assert job["execution_time"] >= 1
    s = session_of(client, sid)
    assert s["state"] == "active" and statuses(s) == ["open", "active"]
    assert s["activated_at"] == s["timestamps"][1]["timestamp"]
    assert s["last_job_started"] and s["last_job_completed"]
    assert ts(s["last_job_completed"]) >= ts(s["last_job_started"]) + 1
    assert 1 <= s["elapsed_time"] < 4
    assert s["active_ttl"] < 10

    s = wait_for(lambda: session_of(client, sid), lambda b: b["state"] != "active", 10)
    assert s["state"] == "inactive" and "interactive_ttl" in s["state_reason"]
    went_inactive = ts(s["timestamps"][2]["timestamp"])
    assert abs(went_inactive - (ts(s["last_job_completed"]) + 2)) < 0.5
    elapsed = s["elapsed_time"]

    job = finished(client, submit(client, sid, "print(x + 1)")["id"])
    assert job["stdout"] == "42\n"  # same kernel: the first job's x is still there
    s = session_of(client, sid)
    assert statuses(s)[:4] == ["open", "active", "inactive", "active"]
    assert s["elapsed_time"] > elapsed

    s = wait_for(lambda: session_of(client, sid), lambda b: b["state"] == "closed", 15)
    assert s["state"] == "closed" and "max_ttl" in s["state_reason"]
    assert statuses(s) == ["open", "active", "inactive", "active", "inactive", "closed"]
    assert abs(ts(s["closed_at"]) - (ts(s["activated_at"]) + 10)) < 0.5
    assert s["active_ttl"] == 0 and s["accepting_jobs"] is False
    assert_ibm_error(client.post(f"{API}/sessions/{sid}/jobs", json={"code": "1"}), 409)
    # The kernel went with the session.
    assert client.get(f"/session/{sid}").status_code == 404


def pool_settled(server: Server, kernels: int, timeout: float = 30) -> None:
    """Wait until the server's warm pool holds ``kernels`` started, idle kernel processes."""
    server_proc = psutil.Process(server.process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):  # a process may end while we look
            pythons = [p for p in server_proc.children(recursive=True)  # not the keepers
                       if "ipykernel_launcher" in " ".join(p.cmdline())]
            if len(pythons) >= kernels and all(p.cpu_percent(0.1) < 5 for p in pythons):
                return
        time.sleep(0.1)
    raise AssertionError("the warm pool did not fill")


def test_batch_runs_jobs_in_parallel_on_fresh_kernels() -> None:
    # A pool as deep as the batch is wide: each job takes a fresh, already started kernel.
    with run_server(pool_python="3") as server, server.client() as c:
        pool_settled(server, 3)
        s = create(c, mode="batch", max_ttl=60)
        assert s["mode"] == "batch" and s["interactive_ttl"] == 1
        code = "import time\nseen = 'mark' in globals()\nmark = 1\ntime.sleep(2)\nprint(seen)"
        t0 = time.monotonic()
        ids = [submit(c, s["id"], code)["id"] for _ in range(3)]
        jobs = [finished(c, i) for i in ids]
        wall = time.monotonic() - t0
        print(f"three 2-second batch jobs: {wall:.2f} s wall")
        assert [j["status"] for j in jobs] == ["completed"] * 3
        assert [j["stdout"] for j in jobs] == ["False\n"] * 3  # no state shared between jobs
        assert all(2 <= j["execution_time"] < 3 for j in jobs)
        assert wall < 4.5, f"batch jobs did not run in parallel: {wall:.2f} s"
        # Their runs overlapped: together they took longer than the span they ran in.
        spans = [(ts(j["completed_at"]) - j["execution_time"], ts(j["completed_at"]))
                 for j in jobs]
        span = max(e for _, e in spans) - min(b for b, _ in spans)
        assert span < sum(j["execution_time"] for j in jobs) - 2

        listed = c.get(f"{API}/sessions/{s['id']}/jobs", params={"size": 2, "index": 1}).json()
        assert listed["paging"] == {"pages": 2, "count": 3}
        assert [j["id"] for j in listed["jobs"]] == ids[2:]
        s = session_of(c, s["id"])
        # elapsed_time is time with a job running, not the sum of the three jobs' times.
        assert 2 <= s["elapsed_time"] < 4.5
        s = wait_for(lambda: session_of(c, s["id"]), lambda b: b["state"] == "inactive", 5)
        assert s["state"] == "inactive"


def test_close_lets_the_running_job_finish_and_cancels_the_queued(client: Client) -> None:
    s = create(client, mode="dedicated", max_ttl=60, interactive_ttl=30)
    sid = s["id"]
    running = submit(client, sid, "import time\ntime.sleep(2)\nprint('done')")
    queued = submit(client, sid, "print('never')")
    wait_for(lambda: job_of(client, running["id"]), lambda j: j["status"] == "running", 10)
    assert job_of(client, queued["id"])["status"] == "queued"

    r = client.delete(f"{API}/sessions/{sid}/close")
    assert r.status_code == 204
    cancelled = job_of(client, queued["id"])
    assert cancelled["status"] == "cancelled" and cancelled["exit_code"] == -1
    s = session_of(client, sid)
    assert s["state"] == "active" and s["accepting_jobs"] is False  # draining
    assert_ibm_error(client.post(f"{API}/sessions/{sid}/jobs", json={"code": "1"}), 409,
                     "conflict")

    done = finished(client, running["id"])
    assert done["status"] == "completed" and done["stdout"] == "done\n"
    s = wait_for(lambda: session_of(client, sid), lambda b: b["state"] == "closed", 10)
    assert s["state"] == "closed" and s["state_reason"] == "closed by request"
    assert ts(s["closed_at"]) >= ts(done["completed_at"])
    assert statuses(s) == ["open", "active", "closed"]
    listed = client.get(f"{API}/sessions/{sid}/jobs").json()
    assert [j["status"] for j in listed["jobs"]] == ["completed", "cancelled"]
    # Closing again changes nothing; reopening a closed session is refused.
    assert client.delete(f"{API}/sessions/{sid}/close").status_code == 204
    assert_ibm_error(client.patch(f"{API}/sessions/{sid}", json={"accepting_jobs": True}), 409)


def test_accepting_jobs_false_closes_once_the_queue_drains(fresh: tuple[Client, str]) -> None:
    c, _ = fresh
    # An open session with nothing to run closes at once.
    s = create(c, mode="batch", max_ttl=60)
    r = c.patch(f"{API}/sessions/{s['id']}", json={"accepting_jobs": False})
    assert r.status_code == 204 and r.text == ""
    s = session_of(c, s["id"])
    assert s["state"] == "closed" and statuses(s) == ["open", "closed"]
    assert "accepting_jobs" in s["state_reason"]

    # With work: queued and running jobs still run, then the session closes.
    # The first job kills its kernel: it fails, and the next job gets the kernel back.
    s = create(c, mode="dedicated", max_ttl=60, interactive_ttl=30)
    first = submit(c, s["id"], "import os, time\ntime.sleep(1)\nos._exit(3)")
    second = submit(c, s["id"], "print(2)")
    assert c.patch(f"{API}/sessions/{s['id']}", json={"accepting_jobs": False}).status_code == 204
    assert session_of(c, s["id"])["accepting_jobs"] is False
    assert_ibm_error(c.post(f"{API}/sessions/{s['id']}/jobs", json={"code": "3"}), 409)
    died = finished(c, first["id"])
    assert died["status"] == "failed" and died["exit_code"] == -1
    assert "died" in died["stderr"]
    assert finished(c, second["id"])["stdout"] == "2\n"
    s = wait_for(lambda: session_of(c, s["id"]), lambda b: b["state"] == "closed", 10)
    assert statuses(s) == ["open", "active", "closed"]


def test_paging_of_sessions(fresh: tuple[Client, str]) -> None:
    c, access = fresh
    made = [create(c, mode="batch", max_ttl=60)["id"] for _ in range(5)]
    everything = c.get(f"{API}/sessions").json()
    assert everything["paging"] == {"pages": 1, "count": 5}
    assert [s["id"] for s in everything["sessions"]] == made[::-1]  # newest first
    assert all(s["user_id"] == access for s in everything["sessions"])
    pages = [c.get("/v1/sessions", params={"size": 2, "index": i}).json() for i in range(4)]
    assert [p["paging"] for p in pages] == [{"pages": 3, "count": 5}] * 4
    assert [len(p["sessions"]) for p in pages] == [2, 2, 1, 0]
    assert [s["id"] for p in pages for s in p["sessions"]] == made[::-1]
    for sid in made:
        assert c.delete(f"/v1/sessions/{sid}/close").status_code == 204
    assert {s["state"] for s in c.get(f"{API}/sessions").json()["sessions"]} == {"closed"}


def test_bad_input_gets_ibm_errors_and_changes_nothing(fresh: tuple[Client, str],
                                                       server: Server) -> None:
    c, _ = fresh
    bad_bodies: list[Any] = [
        {"mode": "exclusive"}, {"max_ttl": 0}, {"max_ttl": "10"}, {"max_ttl": 2**31},
        {"max_ttl": 5, "interactive_ttl": 6}, {"mode": "batch", "max_tll": 5},
        {"language": "cobol"}, [], "dedicated",
    ]
    for body in bad_bodies:
        assert_ibm_error(c.post(f"{API}/sessions", json=body), 400)
    assert_ibm_error(c.post(f"{API}/sessions", data=b"{not json"), 400,
                     "invalid_request_body")
    assert c.get(f"{API}/sessions").json()["paging"]["count"] == 0

    sid = create(c, mode="batch", max_ttl=60)["id"]
    for body in ({}, {"accepting_jobs": "no"}, {"accepting_jobs": None}):
        assert_ibm_error(c.patch(f"{API}/sessions/{sid}", json=body), 400)
    assert_ibm_error(c.patch(f"{API}/sessions/{sid}"), 400)  # no body at all
    for body in ({}, {"code": 1}, {"code": "1", "timeout": 0}, {"code": "1", "timeout": 301},
                 {"code": "1", "language": "ruby"}, {"code": "1", "stdin": ["a"]}):
        assert_ibm_error(c.post(f"{API}/sessions/{sid}/jobs", json=body), 400)
    for params in ({"size": -1}, {"size": "two"}, {"index": "x"}):
        assert_ibm_error(c.get(f"{API}/sessions", params=params), 400)
    s = session_of(c, sid)
    assert s["state"] == "open" and s["accepting_jobs"] is True
    assert c.get(f"{API}/sessions/{sid}/jobs").json() == {"jobs": [],
                                                          "paging": {"pages": 0, "count": 0}}

    assert_ibm_error(c.get(f"{API}/sessions/{uuid.uuid4()}"), 404, "session_not_found")
    assert_ibm_error(c.get(f"{API}/jobs/{uuid.uuid4()}"), 404, "job_not_found")
    assert_ibm_error(c.put(f"{API}/sessions/{sid}", json={}), 405)
    # Another keypair cannot see it; no or wrong credentials are 401.
    with server.client() as other:
        assert_ibm_error(other.get(f"{API}/sessions/{sid}"), 404)
        assert_ibm_error(other.delete(f"{API}/sessions/{sid}/close"), 404)
    assert_ibm_error(requests.get(f"{server.url}{API}/sessions", timeout=10), 401)
    assert_ibm_error(requests.get(f"{server.url}{API}/sessions", timeout=10,
                                  headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    assert session_of(c, sid)["state"] == "open"


def test_other_dialects_sessions_are_sessions_here_too(fresh: tuple[Client, str]) -> None:
    c, access = fresh
    sandbox_id = "sbx-" + uuid.uuid4().hex[:8]
    r = c.post("/api/v1/execute", json={"code": "z = 3", "language": "python",
                                        "session_id": sandbox_id})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    s = session_of(c, sandbox_id)
    assert s["id"] == sandbox_id and s["mode"] == "dedicated" and s["state"] == "active"
    assert "sandbox" in s["state_reason"] and s["user_id"] == access
    assert [x["id"] for x in c.get(f"{API}/sessions").json()["sessions"]] == [sandbox_id]
    assert c.delete(f"{API}/sessions/{sandbox_id}/close").status_code == 204
    assert_ibm_error(c.get(f"{API}/sessions/{sandbox_id}"), 404)

    name = "jobs-" + uuid.uuid4().hex[:8]
    assert c.post("/session", json={"lang": "python", "name": name}).status_code == 201
    s = session_of(c, name)
    assert s["mode"] == "dedicated" and s["state"] == "open" and s["user_id"] == access
    assert "backendai" in s["state_reason"]
    run_to_end(c, "/session", name, "import time; time.sleep(0.3); y = 1")
    s = session_of(c, name)
    assert s["state"] == "active" and statuses(s) == ["open", "active"]
    assert s["last_job_completed"] and s["elapsed_time"] >= 0.3
    listed = c.get(f"{API}/sessions").json()
    assert [x["id"] for x in listed["sessions"]] == [name]
    assert_ibm_error(c.post(f"{API}/sessions/{name}/jobs", json={"code": "1"}), 409)
    # Closing it here ends it everywhere.
    assert c.delete(f"{API}/sessions/{name}/close").status_code == 204
    assert c.get(f"/session/{name}").status_code == 404
    assert_ibm_error(c.get(f"{API}/sessions/{name}"), 404)


def test_restart_keeps_records_and_timers(tmp_path: Path) -> None:
    """A dedicated session outlives a server restart: same record, its timers still run (one
    of them passes while the server is down), a fresh kernel for its next job.

    Timers are stamped with their own deadlines, so those checks are exact; what the load on
    the machine decides is only how long the restart takes (stopping and starting a server with
    kernels took over 20 s on a loaded 2-core machine), so the long session's max_ttl leaves
    room for that, and the interactive_ttl only has to outlast one request after a job."""
    data = tmp_path / "data"
    long_max, long_idle = 45, 3
    with run_server(data_dir=data) as first:
        secret = first.secret_key
        c = first.client()
        c.headers.pop("X-API-Key")
        c.headers["Authorization"] = f"Bearer {secret}"
        long = create(c, mode="dedicated", max_ttl=long_max, interactive_ttl=long_idle)
        short = create(c, mode="dedicated", max_ttl=4, interactive_ttl=1)
        waiting = create(c, mode="batch", max_ttl=60)
        assert finished(c, submit(c, long["id"], "x = 1")["id"])["status"] == "completed"
        before = session_of(c, long["id"])
        assert before["state"] == "active"
        assert finished(c, submit(c, short["id"], "x = 1")["id"])["status"] == "completed"
        short_activated = ts(session_of(c, short["id"])["activated_at"])
        c.close()
    # Down long enough for the short session's max_ttl and the long one's interactive_ttl
    # (the long one's job ended before the short one's started).
    time.sleep(max(0.0, short_activated + 4.2 - time.time()))
    with run_server(data_dir=data) as second:
        c = second.client(secret)
        s = session_of(c, short["id"])
        assert s["state"] == "closed" and "max_ttl" in s["state_reason"]
        assert abs(ts(s["closed_at"]) - (ts(s["activated_at"]) + 4)) < 0.01

        asked = time.time()
        s = session_of(c, long["id"])
        answered = time.time()
        for key in ("id", "started_at", "activated_at", "last_job_started", "last_job_completed",
                    "max_ttl", "interactive_ttl", "mode", "user_id"):
            assert s[key] == before[key], key
        assert s["timestamps"][:2] == before["timestamps"]
        assert s["state"] == "inactive"  # its interactive_ttl passed while the server was down
        went_inactive = ts(s["timestamps"][2]["timestamp"])
        assert abs(went_inactive - (ts(before["last_job_completed"]) + long_idle)) < 0.01
        assert "restarted" in s["state_reason"]
        # The max_ttl still counts from the first activation (active_ttl is rounded up).
        ends = ts(s["activated_at"]) + long_max
        assert ends - answered <= s["active_ttl"] <= ends - asked + 1

        job = finished(c, submit(c, long["id"], "print(x)")["id"])
        assert job["status"] == "completed" and "NameError" in job["stderr"]  # fresh kernel
        assert job["exit_code"] == 1
        assert session_of(c, long["id"])["state"] == "active"
        assert session_of(c, waiting["id"])["state"] == "open"
        # The restarted server runs the timers: idle again interactive_ttl after that job...
        s = wait_for(lambda: session_of(c, long["id"]), lambda b: b["state"] == "inactive", 30)
        assert s["state"] == "inactive", s
        assert abs(ts(s["timestamps"][-1]["timestamp"])
                   - (ts(s["last_job_completed"]) + long_idle)) < 0.01
        # ...and closed at the max_ttl set before the restart.
        s = wait_for(lambda: session_of(c, long["id"]), lambda b: b["state"] == "closed",
                     ends - time.time() + 30)
        assert s["state"] == "closed" and "max_ttl" in s["state_reason"]
        assert abs(ts(s["closed_at"]) - ends) < 0.01
        c.close()


def test_open_session_without_jobs_closes_after_the_open_ttl() -> None:
    # No warm kernel: the POST waits for a kernel start, which on a loaded machine may take
    # longer than the whole TTL; the TTL counts from kernel ready, so the session is still open.
    with run_server(job_open_ttl_s="2", pool_python="0") as server, server.client() as c:
        posted = time.time()
        r = c.post(f"{API}/sessions", json={"mode": "dedicated", "max_ttl": 600})
        answered = time.time()
        assert r.status_code == 200, r.text
        sid = r.json()["id"]
        assert session_of(c, sid)["state"] == "open"
        s = wait_for(lambda: session_of(c, sid), lambda b: b["state"] == "closed", timeout=30)
        assert s["state"] == "closed", s
        assert "no job was submitted within 2 s" in s["state_reason"]
        assert [t["status"] for t in s["timestamps"]] == ["open", "closed"]
        # The close is stamped with the deadline itself (however late the reaper ran), and the
        # deadline was set during the POST: 2 s after a moment between sending and the answer
        # (timestamps are written to the millisecond).
        assert posted + 2 - 0.002 <= ts(s["closed_at"]) <= answered + 2 + 0.002
        assert c.post(f"{API}/sessions/{sid}/jobs", json={"code": "1"}).status_code == 409
