"""Isolation and limits (issue 8): user code is hostile.

Every test runs code inside a real session of a real server and asserts what that code could
(not) do. Each one fails without the sandbox: run this file with ``KB_ISOLATION_SANDBOX=off``
to watch the negative control (the server then runs kernels unconfined and uncapped).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from bridge.binds import unreadable_entries
from bridge.doctor import cgroups

from .support import ROOT, Client, Server, console_text, free_port, run_server, run_to_end

SANDBOX = os.environ.get("KB_ISOLATION_SANDBOX", "auto")
MAX_PIDS = 48
OUTPUT_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with run_server(sandbox=SANDBOX, max_pids=str(MAX_PIDS), output_limit=str(OUTPUT_LIMIT),
                    allow_network="1", pool_python="0") as s:
        yield s


@pytest.fixture(scope="module")
def api(srv: Server) -> Iterator[Client]:
    with srv.client() as c:
        yield c


def create(api: Client, **body: Any) -> dict[str, Any]:
    name = "iso-" + uuid.uuid4().hex[:10]
    r = api.post("/session", json={"lang": "python", "name": name, **body})
    assert r.status_code == 201, r.text
    return {"name": name, **r.json()}


@pytest.fixture(scope="module")
def probe(api: Client) -> Iterator[str]:
    """One session the read-only checks share."""
    s = create(api)
    yield s["name"]
    api.delete(f"/session/{s['name']}")


def run(api: Client, name: str, code: str) -> tuple[str, str, int | None]:
    results = run_to_end(api, "/session", name, code)
    return console_text(results, "stdout"), console_text(results, "stderr"), \
        results[-1]["exitCode"]


def lines_json(out: str) -> Any:
    """The last stdout line, as JSON (the probes print one result line)."""
    return json.loads(out.strip().splitlines()[-1])


def kernel_cgroups(kernel_id: str) -> list[str]:
    return [d for d in glob.glob(f"/sys/fs/cgroup/**/kernel-bridge/{kernel_id}", recursive=True)
            if os.path.isdir(d)]


# -- what user code can see and reach -----------------------------------------------------------


def test_server_port_and_internet_unreachable(srv: Server, api: Client, probe: str) -> None:
    code = f"""
import json, socket
seen = {{}}
for host, port in [("127.0.0.1", {srv.port}), ("localhost", {srv.port}), ("1.1.1.1", 80),
                   ("8.8.8.8", 53)]:
    try:
        socket.create_connection((host, port), timeout=3).close()
        seen[f"{{host}}:{{port}}"] = "open"
    except OSError as e:
        seen[f"{{host}}:{{port}}"] = type(e).__name__
try:
    socket.getaddrinfo("example.com", 80)
    seen["dns"] = "resolved"
except OSError as e:
    seen["dns"] = type(e).__name__
seen["interfaces"] = [n for _, n in socket.if_nameindex()]
print(json.dumps(seen))
"""
    out, _err, _ = run(api, probe, code)
    seen = lines_json(out)
    assert "open" not in seen.values() and seen["dns"] != "resolved", seen
    assert seen["interfaces"] == ["lo"], seen  # a network namespace of its own

    # The operator allowed network (KB_ALLOW_NETWORK) and this session asks for it: then the
    # same probe reaches the server, so the refusal above is the sandbox's doing.
    s = create(api, config={"network": True})
    try:
        out, _, _ = run(api, s["name"], code)
        assert lines_json(out)[f"127.0.0.1:{srv.port}"] == "open"
    finally:
        api.delete(f"/session/{s['name']}")


def test_data_dir_sqlite_and_secrets_invisible(srv: Server, api: Client, probe: str) -> None:
    db = srv.data_dir / "kernel-bridge.sqlite3"
    assert db.exists()
    code = f"""
import json, os
out = {{}}
for p in [{str(srv.data_dir)!r}, {str(db)!r}, {str(srv.data_dir / "sessions")!r},
          {str(ROOT / "bridge")!r}, {str(ROOT / "pyproject.toml")!r}]:
    try:
        open(p, "rb").read(16) if os.path.isfile(p) else os.listdir(p)
        out[p] = "readable"
    except OSError as e:
        out[p] = type(e).__name__
try:
    out["root"] = sorted(os.listdir({str(ROOT)!r}))
except OSError as e:
    out["root"] = []
out["env"] = sorted(k for k in os.environ if k.startswith("KB_"))
print(json.dumps(out))
"""
    out, _, _ = run(api, probe, code)
    seen = lines_json(out)
    assert "readable" not in seen.values(), seen
    assert seen["env"] == []
    # A venv inside the checkout (as `make` makes it) is bound read-only at its own path, so
    # the checkout's dir exists in the sandbox; nothing of the checkout but the venv does.
    venv = Path(sys.prefix)
    allowed = {venv.name} if venv.parent == ROOT else set()
    assert set(seen["root"]) <= allowed, seen["root"]

    # Nothing readable anywhere holds a keypair secret: scan every small file outside the
    # system trees (which are the host's own, read-only) for the server's keys.
    scan = f"""
import os
# Reversed here, so this cell's own text (kept in IPython's history) does not match.
needles = [k[::-1].encode() for k in ({srv.secret_key[::-1]!r}, {srv.access_key[::-1]!r})]
found, files = [], 0
for top, dirs, names in os.walk("/"):
    if top in ("/proc", "/sys", "/dev", "/usr") or "/toolchains/" in top + "/":
        dirs[:] = []
        continue
    for n in names:
        p = os.path.join(top, n)
        try:
            if os.path.islink(p) or os.path.getsize(p) > 4 << 20:
                continue
            data = open(p, "rb").read()
        except OSError:
            continue
        files += 1
        if any(x in data for x in needles):
            found.append(p)
print(files, found)
"""
    out, err, _ = run(api, probe, scan)
    files, found = out.split(" ", 1)
    assert int(files) > 100 and found.strip() == "[]", (out, err[-500:])
    # ...and the host files that do hold them are masked: root-only /etc files too.
    out, _, _ = run(api, probe, "try:\n    print(repr(open('/etc/shadow').read()[:4]))\n"
                                "except OSError as e:\n    print(type(e).__name__)")
    # The sandbox binds /dev/null over every /etc file the "others" bits keep out (bridge.binds),
    # read-only and so nodev: opening it is refused, as the file itself would be to the sandbox uid.
    assert "/etc/shadow" in unreadable_entries("/etc")[1]
    assert out.strip() == "PermissionError", out


def test_other_sessions_not_found_by_walking_root(api: Client, probe: str) -> None:
    other = create(api)
    marker = "marker-" + uuid.uuid4().hex
    try:
        out, _, _ = run(api, other["name"], f"open({marker!r}, 'w').write('x'); print('ok')")
        assert out.strip() == "ok"
        code = f"""
import os
hits, dirs_seen = [], 0
for top, dirs, names in os.walk("/"):
    if top in ("/proc", "/sys", "/dev", "/usr"):
        dirs[:] = []
        continue
    dirs_seen += 1
    for n in names + dirs:
        if {marker!r} in n or {other["sessionId"]!r} in n or n.endswith(".sqlite3"):
            hits.append(os.path.join(top, n))
print(dirs_seen, hits)
"""
        out, _, _ = run(api, probe, code)
        count, hits = out.split(" ", 1)
        assert int(count) > 10 and hits.strip() == "[]", out
    finally:
        api.delete(f"/session/{other['name']}")


def test_writes_outside_home_work_refused(srv: Server, api: Client, probe: str) -> None:
    marker = uuid.uuid4().hex
    code = f"""
import json, os, sys
res = {{}}
targets = ["/{marker}", "/usr/{marker}", "/etc/{marker}", "/opt/{marker}", "/root/{marker}",
           "/home/{marker}", os.path.join(sys.prefix, "{marker}")]
for p in targets:
    try:
        with open(p, "w") as f:
            f.write("x")
        os.remove(p)
        res[p] = "written"
    except OSError as e:
        res[p] = type(e).__name__
# A host-wide sysctl: write back the value it already has (harmless if it went through).
try:
    value = open("/proc/sys/vm/overcommit_ratio").read()
    with open("/proc/sys/vm/overcommit_ratio", "w") as f:
        f.write(value)
    res["sysctl"] = "written"
except OSError as e:
    res["sysctl"] = type(e).__name__
for p in ("/home/work/{marker}", "/tmp/{marker}"):
    with open(p, "w") as f:
        f.write("mine")
    res[p] = "ok"
print(json.dumps(res))
"""
    out, _err, _ = run(api, probe, code)
    res = lines_json(out)
    assert res.pop(f"/home/work/{marker}") == "ok" and res.pop(f"/tmp/{marker}") == "ok"
    assert "written" not in res.values(), res
    # The session's own dir is the host's: the file is there for the server to serve.
    assert [p.read_text() for p in (srv.data_dir / "sessions").glob(f"*/{marker}")] == ["mine"]


def test_only_own_processes_in_proc(api: Client, probe: str) -> None:
    code = """
import json, os
procs = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        procs[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
    except OSError:
        pass
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"procs": procs, "cap_eff": status["CapEff"].strip(),
                  "cap_prm": status["CapPrm"].strip(), "nnp": status["NoNewPrivs"].strip(),
                  "sid_is_own": os.getsid(0) != os.getsid(1), "host": os.uname().nodename}))
"""
    out, _, _ = run(api, probe, code)
    seen = lines_json(out)
    cmdlines = list(seen["procs"].values())
    assert not any("api.cli" in c for c in cmdlines), cmdlines  # not even the server
    assert len(cmdlines) <= 4 and "bwrap" in seen["procs"]["1"], cmdlines
    assert seen["cap_eff"] == seen["cap_prm"] == "0000000000000000" and seen["nnp"] == "1"
    assert seen["host"] == "sandbox"


# -- caps: processes, memory, output --------------------------------------------------------


def test_process_flood_capped_while_server_answers(srv: Server, api: Client) -> None:
    s = create(api)
    pings: list[tuple[int, float]] = []
    stop = threading.Event()

    def ping() -> None:
        while not stop.is_set():
            t = time.monotonic()
            r = requests.get(srv.url + "/", timeout=10)
            pings.append((r.status_code, time.monotonic() - t))
            time.sleep(0.2)

    pinger = threading.Thread(target=ping)
    pinger.start()
    code = """
import subprocess
procs, error = [], "none"
try:
    for _ in range(300):
        procs.append(subprocess.Popen(["sleep", "60"]))
except OSError as e:
    error = type(e).__name__
for p in procs:
    p.kill()
    p.wait()
print(len(procs), error)
"""
    try:
        out, err, _ = run(api, s["name"], code)
    finally:
        stop.set()
        pinger.join()
    started, error = out.split()
    assert int(started) < MAX_PIDS and error == "BlockingIOError", (out, err[-300:])
    assert pings and all(code == 200 for code, _ in pings)
    assert max(t for _, t in pings) < 5, pings
    # The session lives on, and the CPU its children burnt counts against its credit.
    assert run(api, s["name"], "print(6 * 7)")[0].strip() == "42"
    info = api.get(f"/session/{s['name']}").json()
    assert info["cpuCreditUsed"] > 0 and info["memoryUsed"] > 0
    api.delete(f"/session/{s['name']}")


def test_two_gib_allocation_contained_by_small_cap(srv: Server, api: Client) -> None:
    cap_kib = 256 * 1024
    s = create(api, limits={"maxMem": cap_kib})
    code = """
chunks = []
for i in range(2048):
    chunks.append(b"x" * (1 << 20))
    if i % 256 == 0:
        print(i, flush=True)
print("allocated", len(chunks), "MiB")
"""
    out, err, exit_code = run(api, s["name"], code)
    assert "allocated 2048" not in out
    if cgroups().verdict == "ok":  # the cgroup's OOM killer ends the kernel
        assert exit_code == 130, (out[-300:], err[-300:], exit_code)
    else:  # RLIMIT_AS alone: the allocation itself fails inside the program
        assert "MemoryError" in err, (out[-300:], err[-300:], exit_code)
    assert requests.get(srv.url + "/", timeout=10).status_code == 200
    info = api.get(f"/session/{s['name']}").json()
    assert info["memoryLimit"] == cap_kib
    stats = api.delete(f"/session/{s['name']}").json()["stats"]
    assert stats["mem_max_bytes"] <= cap_kib * 1024 * 1.05, stats


def test_print_flood_returns_capped_console(srv: Server, api: Client) -> None:
    s = create(api)
    server = psutil.Process(srv.process.pid)
    before = server.memory_info().rss
    code = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\nprint('end')"
    t = time.monotonic()
    results = run_to_end(api, "/session", s["name"], code)
    elapsed = time.monotonic() - t
    out, err = console_text(results, "stdout"), console_text(results, "stderr")
    assert results[-1]["status"] == "finished" and results[-1]["exitCode"] == 0
    assert OUTPUT_LIMIT // 2 <= len(out) <= OUTPUT_LIMIT, len(out)
    assert "output limit" in err and "dropped" in err, err[-300:]
    grown = server.memory_info().rss - before
    assert grown < 150 * 1024 * 1024, (grown, elapsed)
    assert requests.get(srv.url + "/", timeout=10).status_code == 200
    api.delete(f"/session/{s['name']}")


# -- a kernel that dies -------------------------------------------------------------------------


def test_sigkilled_kernel_ends_run_and_session_restarts(srv: Server, api: Client) -> None:
    s = create(api)
    name = s["name"]
    out, _, _ = run(api, name, "from ipykernel import get_connection_file\n"
                               "print(get_connection_file())")
    kernel_id = Path(out.strip()).parent.name
    groups = kernel_cgroups(kernel_id)
    assert groups and all(Path(f"{g}/cgroup.procs").read_text().split() for g in groups), groups
    assert any(Path(f"{g}/pids.max").read_text().strip() == str(MAX_PIDS)
               for g in groups if os.path.exists(f"{g}/pids.max"))

    results = run_to_end(api, "/session", name, "import os, signal\n"
                                                "os.kill(os.getpid(), signal.SIGKILL)")
    assert results[-1]["status"] == "finished" and results[-1]["exitCode"] == 130
    assert "died" in console_text(results, "stderr")
    assert api.get(f"/session/{name}").json()["status"] == "ERROR"

    assert api.patch(f"/session/{name}").status_code == 204
    assert api.get(f"/session/{name}").json()["status"] == "RUNNING"
    assert run(api, name, "print(6 * 7)")[0].strip() == "42"
    # The restarted kernel is capped again: it sits in the same cgroup.
    assert all(Path(f"{g}/cgroup.procs").read_text().split() for g in groups)
    assert api.delete(f"/session/{name}").status_code == 200
    assert kernel_cgroups(kernel_id) == []  # removed with the kernel


# -- start-up without a sandbox tool ------------------------------------------------------------


def test_serve_refuses_without_bwrap_unless_told() -> None:
    with tempfile.TemporaryDirectory(prefix="kb-nobwrap-") as tmp:
        bin_dir = Path(tmp) / "bin"  # python3 and nothing else: no bwrap
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(sys.executable)
        env = {**os.environ, "PATH": str(bin_dir), "KB_POOL_PYTHON": "0"}
        env.pop("KB_SANDBOX", None)
        port = free_port()
        argv = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--data-dir",
                f"{tmp}/data"]
        refused = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2
        assert "bubblewrap" in refused.stderr and "--no-sandbox" in refused.stderr
        assert not (Path(tmp) / "data" / "kernel-bridge.sqlite3").exists()

        for extra, env_extra in (([], {"KB_SANDBOX": "off"}), (["--no-sandbox"], {})):
            log_path = Path(tmp) / "server.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(argv + extra, cwd=ROOT, env={**env, **env_extra},
                                        stdout=subprocess.PIPE, stderr=log, text=True)
            try:
                assert proc.stdout is not None
                lines = iter(proc.stdout.readline, "")
                secret = ""
                for line in lines:
                    if line.startswith("{"):
                        secret = json.loads(line)["secret_key"]
                    if "listening on" in line:
                        break
                assert "SANDBOX OFF" in log_path.read_text()  # the warning, on every start
                assert bool(secret) == (not extra)  # the first start made the first keypair
                if secret:  # an unconfined server grants no network either unless allowed
                    with Client(f"http://127.0.0.1:{port}", secret) as c:
                        r = c.post("/session", json={"lang": "python",
                                                     "config": {"network": True}})
                        assert r.status_code == 400 and "etwork" in r.json()["msg"]
            finally:
                proc.terminate()
                proc.wait(timeout=20)
                proc.stdout.close()  # type: ignore[union-attr]
