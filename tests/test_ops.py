"""Operating the server: /metrics moves with real traffic, /healthz and /readyz (and readyz failing
when the sandbox breaks under a running server), JSON access logs with request ids, and
`kernel-bridge doctor` passing here and failing, with a fix, for each broken prerequisite."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .support import ROOT, Client, Server, free_port, run_server, run_to_end


def scrape(url: str, **kwargs: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = requests.get(url + "/metrics", timeout=30, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def ops_server() -> Iterator[Server]:
    # At most three executions a minute per keypair: the fourth is a refusal to count.
    with run_server(log_format="json", pool_python="1", rate_limit="3") as s:
        yield s


@pytest.fixture
def ops_client(ops_server: Server) -> Iterator[Client]:
    with ops_server.client() as c:
        yield c


def wait_ready(url: str, timeout: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = requests.get(url + "/readyz", timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


# -- /metrics -----------------------------------------------------------------------------------


def test_metrics_move_with_a_query_a_one_shot_a_refusal_and_a_timeout(
        ops_server: Server, ops_client: Client) -> None:
    url, ak = ops_server.url, ops_server.access_key
    before = scrape(url)  # no credentials needed: the server listens on loopback

    # A Backend.AI query in a session.
    r = ops_client.post("/session", json={"lang": "python", "clientSessionToken": "metrics-q"})
    assert r.status_code == 201, r.text
    results = run_to_end(ops_client, "/session", "metrics-q", "print(6*7)")
    assert results[-1]["status"] == "finished"
    mid = scrape(url)
    assert value(mid, "kernel_bridge_runs_total", mode="query", outcome="finished") == \
        value(before, "kernel_bridge_runs_total", mode="query", outcome="finished") + 1
    assert value(mid, "kernel_bridge_run_duration_seconds_count", mode="query") == \
        value(before, "kernel_bridge_run_duration_seconds_count", mode="query") + 1
    assert value(mid, "kernel_bridge_sessions", dialect="backendai", language="python",
                 state="RUNNING") == 1
    assert value(mid, "kernel_bridge_keypair_sessions", access_key=ak) == 1
    assert value(mid, "kernel_bridge_kernel_start_seconds_count", kernelspec="kb-python") >= 1
    # A kernel that dies under a run.
    results = run_to_end(ops_client, "/session", "metrics-q", "import os; os._exit(1)")
    assert results[-1]["exitCode"] == 130, results
    died = scrape(url)
    assert value(died, "kernel_bridge_kernel_deaths_total", language="python", cause="exit") == \
        value(before, "kernel_bridge_kernel_deaths_total", language="python", cause="exit") + 1
    assert value(died, "kernel_bridge_runs_total", mode="query", outcome="failed") == \
        value(before, "kernel_bridge_runs_total", mode="query", outcome="failed") + 1
    assert value(died, "kernel_bridge_sessions", dialect="backendai", language="python",
                 state="ERROR") == 1

    # A one-shot Sandbox execution.
    r = ops_client.post("/api/v1/execute", json={"language": "python", "code": "print(1)"})
    assert r.status_code == 200 and r.json()["stdout"] == "1\n", r.text
    # A refusal: a key nobody has.
    r = requests.get(url + "/session", headers={"X-API-Key": "not-a-key"}, timeout=30)
    assert r.status_code == 401
    # A timeout.
    r = ops_client.post("/api/v1/execute", json={"language": "python", "timeout": 1,
                                                  "code": "import time; time.sleep(30)"})
    assert r.status_code == 200 and r.json()["exit_code"] == -1, r.text
    # Another, then one over the rate limit (429).
    r = ops_client.post("/api/v1/execute", json={"language": "python", "code": "print(3)"})
    assert r.status_code == 200, r.text
    r = ops_client.post("/api/v1/execute", json={"language": "python", "code": "print(4)"})
    assert r.status_code == 429, r.text

    after = scrape(url)
    for name, labels, delta in [
        ("kernel_bridge_executions_total", {"language": "python", "outcome": "completed"}, 2),
        ("kernel_bridge_refusals_total", {"dialect": "sandbox", "reason": "rate_limited"}, 1),
        ("kernel_bridge_executions_total", {"language": "python", "outcome": "failed"}, 1),
        ("kernel_bridge_refusals_total", {"dialect": "backendai", "reason": "unauthorized"}, 1),
        ("kernel_bridge_timeouts_total", {"mode": "query"}, 1),
        ("kernel_bridge_runs_total", {"mode": "query", "outcome": "exec-timeout"}, 1),
        ("kernel_bridge_runs_total", {"mode": "query", "outcome": "finished"}, 3),
    ]:
        got = value(after, name, **labels) - value(before, name, **labels)
        assert got == delta, (name, labels, got)
    # Per-keypair usage is labelled by existing access keys only; the bad key made no series.
    assert value(after, "kernel_bridge_keypair_queries_total", access_key=ak) >= 3
    assert not any("not-a-key" in str(labels) for _, labels in after)
    # The configured stock (1), plus one per take that had to wait once the pool had been full
    # (bridge/pool.py: the stock follows demand), never beyond 4× the configured size.
    target = value(after, "kernel_bridge_pool_target", language="python")
    waits = value(after, "kernel_bridge_pool_waits_total", language="python")
    assert 1 <= target <= min(4, 1 + waits), (target, waits)
    assert value(after, "kernel_bridge_pool_takes_total", language="python", result="hit") + \
        value(after, "kernel_bridge_pool_takes_total", language="python", result="miss") >= 3
    assert value(after, "kernel_bridge_http_requests_total", dialect="sandbox", code="2xx") >= 2


def test_an_oom_kill_is_counted(ops_server: Server, ops_client: Client) -> None:
    before = scrape(ops_server.url)
    r = ops_client.post("/session", json={"lang": "python", "clientSessionToken": "oom-kill",
                                          "limits": {"maxMem": 128 * 1024}})
    assert r.status_code == 201, r.text
    results = run_to_end(ops_client, "/session", "oom-kill",
                         "chunks = [b'x' * (1 << 20) for _ in range(1024)]")
    assert results[-1]["exitCode"] == 130, results[-1]  # the cgroup's OOM killer ended it
    assert ops_client.delete("/session/oom-kill").status_code == 200
    after = scrape(ops_server.url)
    assert value(after, "kernel_bridge_kernel_deaths_total", language="python", cause="oom") \
        == value(before, "kernel_bridge_kernel_deaths_total", language="python", cause="oom") + 1
    assert value(after, "kernel_bridge_oom_kills_total", language="python") >= \
        value(before, "kernel_bridge_oom_kills_total", language="python") + 1


def test_json_access_log_carries_request_ids_and_no_secrets(
        ops_server: Server, ops_client: Client) -> None:
    r = ops_client.post("/session", json={"lang": "python", "clientSessionToken": "logged"},
                        headers={"X-Request-Id": "req-42.a"})
    assert r.status_code == 201 and r.headers["X-Request-Id"] == "req-42.a"
    sid = r.json()["sessionId"]
    r = ops_client.post("/session/logged", json={"mode": "query", "code": "print('zebra' * 2)"})
    assert r.status_code == 200
    generated = r.headers["X-Request-Id"]
    assert len(generated) == 32  # made by the server
    # A forged id (spaces, quotes) is replaced, never echoed into headers or logs.
    r = ops_client.get("/session/logged", headers={"X-Request-Id": 'x" injected'})
    assert r.headers["X-Request-Id"] != 'x" injected'
    r = requests.get(ops_server.url + "/no/such/route", timeout=30)
    assert r.status_code == 404 and r.headers["X-Request-Id"]

    time.sleep(0.2)
    lines = [ln for ln in ops_server.log().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    access = {rec["request_id"]: rec for rec in records if rec["logger"] == "kernel_bridge.access"}
    created = access["req-42.a"]
    assert created["dialect"] == "backendai" and created["route"] == "/session"
    assert created["status"] == 201 and created["access_key"] == ops_server.access_key
    assert created["duration_ms"] > 0
    queried = access[generated]
    assert queried["route"] == "/session/{}" and queried["session_id"] == sid
    log = ops_server.log()
    assert ops_server.secret_key not in log and "zebra" not in log


# -- health ---------------------------------------------------------------------------------------


def test_healthz_and_readyz(ops_server: Server) -> None:
    r = requests.get(ops_server.url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = wait_ready(ops_server.url)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready",
                        "checks": {"store": "ok", "sandbox": "ok", "pool": "ok"}}


def test_readyz_fails_when_bwrap_goes_away_and_metrics_auth_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which("bwrap")
    assert real is not None
    with tempfile.TemporaryDirectory(prefix="kb-bwrap-") as tmp:
        bindir = Path(tmp) / "bin"
        bindir.mkdir()
        (bindir / "bwrap").symlink_to(real)  # the server resolves bwrap here at start
        monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        with run_server(pool_python="0", metrics_auth="on") as s:
            assert wait_ready(s.url).status_code == 200
            # KB_METRICS_AUTH=on: a scrape needs a key, even on loopback.
            assert requests.get(s.url + "/metrics", timeout=30).status_code == 401
            scrape(s.url, headers={"X-API-Key": s.secret_key})

            (bindir / "bwrap").unlink()  # an upgrade or a cleanup removes the sandbox tool
            deadline = time.monotonic() + 30
            while True:
                r = requests.get(s.url + "/readyz", timeout=30)
                if r.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "not ready"
            assert body["checks"]["sandbox"].startswith("sandbox broken")
            assert body["checks"]["store"] == "ok"
            # Alive all the same: a liveness probe must not restart it for this.
            assert requests.get(s.url + "/healthz", timeout=30).status_code == 200


# -- doctor ---------------------------------------------------------------------------------------


def kb(*args: str, env: dict[str, str] | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})},
                          timeout=timeout)


def verdicts(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        head, sep, _ = line.partition(": ")
        if sep and head[:4].strip() in ("OK", "WARN", "FAIL", "SKIP"):
            found[head[6:]] = head[:4].strip()
    return found


def test_doctor_passes_here(tmp_path: Path) -> None:
    started = time.monotonic()
    out = kb("doctor", "--data-dir", str(tmp_path / "data"))
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    v = verdicts(out.stdout)
    for name in ("bubblewrap", "user namespaces", "seccomp", "cgroups", "provisioner", "disk quota",
                 "IPC root", "data dir", "free space", "database", "language python",
                 "language c"):
        assert v.get(name) == "OK", (name, out.stdout)
    assert "Python 3." in out.stdout and "gcc" in out.stdout  # toolchain versions
    assert "safe to serve" in out.stdout
    print(f"doctor took {took:.2f} s")


def test_doctor_fails_with_a_fix_for_each_broken_prerequisite(tmp_path: Path) -> None:
    # No bwrap on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    out = kb("doctor", "--data-dir", str(tmp_path / "d1"), env={"PATH": str(bindir)})
    assert out.returncode == 1
    assert verdicts(out.stdout)["bubblewrap"] == "FAIL"
    assert "fix: apt-get install bubblewrap" in out.stdout
    assert "NOT safe to serve" in out.stdout
    # Toolchains are missing too: warnings (the server would offer fewer languages), each with
    # the package that brings it.
    assert verdicts(out.stdout)["language c"] == "WARN"
    assert "fix: apt-get install gcc" in out.stdout

    # A data dir other users can read.
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    out = kb("doctor", "--data-dir", str(loose))
    assert out.returncode == 1 and verdicts(out.stdout)["data dir"] == "FAIL"
    assert f"fix: chmod 700 {loose}" in out.stdout

    # An IPC root (where kernel sockets live) owned by another user.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    foreign = tmpdir / f"kb-ipc-{os.getuid()}"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    out = kb("doctor", "--data-dir", str(tmp_path / "d2"), env={"TMPDIR": str(tmpdir)})
    assert out.returncode == 1 and verdicts(out.stdout)["IPC root"] == "FAIL"
    assert "owned by uid 65534" in out.stdout and f"fix: rm -rf {foreign}" in out.stdout

    # A database that is not one.
    broken = tmp_path / "broken"
    broken.mkdir(mode=0o700)
    (broken / "kernel-bridge.sqlite3").write_bytes(b"this is not a database" * 100)
    out = kb("doctor", "--data-dir", str(broken))
    assert out.returncode == 1 and verdicts(out.stdout)["database"] == "FAIL"
    assert "fix: restore" in out.stdout


def test_serve_refuses_a_failed_check_unless_unsafe(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    foreign = tmpdir / f"kb-ipc-{os.getuid()}"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    env = {"TMPDIR": str(tmpdir), "KB_POOL_PYTHON": "0"}
    port = str(free_port())
    argv = ["serve", "--port", port, "--data-dir", str(tmp_path / "data")]
    out = kb(*argv, env=env, timeout=60)
    assert out.returncode == 2
    assert "IPC root" in out.stderr and "fix: rm -rf" in out.stderr
    assert "refusing to start" in out.stderr and "--unsafe" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything

    proc = subprocess.Popen([sys.executable, "-m", "api.cli", *argv, "--unsafe"], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, ""):
            if "listening on" in line:
                break
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "UNSAFE" in err


def test_keys_create_makes_a_private_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    assert kb("keys", "create", "--data-dir", str(data)).returncode == 0
    assert data.stat().st_mode & 0o777 == 0o700
    assert sqlite3.connect(data / "kernel-bridge.sqlite3").execute(
        "SELECT count(*) FROM keypairs").fetchone() == (1,)
