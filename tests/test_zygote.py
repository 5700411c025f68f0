"""Zygote kernels (issue 14): forked kernels behave like cold ones, and nothing outlives the server.

Through the real server. A kernel forked by the zygote is recognisable from inside: its parent
is outside its PID namespace, so ``os.getppid()`` is 0; a cold kernel's parent is bubblewrap's
init (1).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from bridge.zygote import forkable

from .support import ROOT, Client, Server, console_text, create_session, run_server, run_to_end

PROBE = """
import json, os, random, uuid
try:
    import numpy
    np_value = float(numpy.random.random())
except ImportError:
    np_value = None
status = dict(l.rstrip("\\n").split(":\\t", 1) for l in open("/proc/self/status") if ":\\t" in l)
print(json.dumps({"ppid": os.getppid(), "random": random.random(), "uuid": str(uuid.uuid4()),
                  "numpy": np_value, "cwd": os.getcwd(), "CapEff": status["CapEff"],
                  "CapBnd": status["CapBnd"], "NoNewPrivs": status["NoNewPrivs"].strip(),
                  "uid": os.getuid(), "pids": sorted(int(p) for p in os.listdir("/proc")
                                                      if p.isdigit()),
                  "env_marker": os.environ.get("ZYGOTE_TEST")}))
"""


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with run_server(zygote="on", pool_python="0") as s:
        yield s


@pytest.fixture(scope="module")
def api(srv: Server) -> Iterator[Client]:
    with srv.client() as c:
        yield c


def create(api: Client, **body: Any) -> str:
    return create_session(api, "zy", **body)


def probe(api: Client, name: str) -> dict[str, Any]:
    results = run_to_end(api, "/session", name, PROBE)
    out = console_text(results, "stdout").strip().splitlines()
    assert out, results
    value: dict[str, Any] = json.loads(out[-1])
    return value


def zygotes_of(srv: Server) -> list[psutil.Process]:
    """The server's zygotes (not its plain keeper, which only spawns cold kernels)."""
    return [p for p in psutil.Process(srv.process.pid).children()
            if "kernelspecs._zygote" in (cmd := " ".join(p.cmdline())) and "--plain" not in cmd]


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def zygote_of(srv: Server) -> psutil.Process:
    found = zygotes_of(srv)
    assert found, "no zygote under the server"
    return found[0]


def test_forked_kernels_are_confined_like_cold_ones(api: Client) -> None:
    name = create(api, config={"environ": {"ZYGOTE_TEST": "yes"}})
    p = probe(api, name)
    assert p["ppid"] == 0, p  # forked: its parent (the zygote) is outside the sandbox
    assert p["cwd"] == "/home/work"
    assert int(p["CapEff"], 16) == 0 and p["NoNewPrivs"] == "1"
    assert p["env_marker"] == "yes"  # the client's environment reached the forked kernel
    assert max(p["pids"]) < 10  # its own PID namespace: the holder, the kernel, little else
    api.delete(f"/session/{name}")


HOLDER_PROBE = """
import ctypes, json, os, signal
def status(pid):
    return dict(l.rstrip("\\n").split(":\\t", 1) for l in open(f"/proc/{pid}/status")
                if ":\\t" in l)
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
holder = next(p for p in (int(d) for d in os.listdir("/proc") if d.isdigit())
              if open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")[0] == b"sleep")
s = status(holder)
libc = ctypes.CDLL(None, use_errno=True)
print(json.dumps({
    "cmdline": open(f"/proc/{holder}/cmdline", "rb").read().decode().split("\\0"),
    "uid": s["Uid"].split(), "gid": s["Gid"].split(), "groups": s["Groups"].split(),
    "caps": {k: s[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    "nnp": s["NoNewPrivs"].strip(), "seccomp": s["Seccomp"].strip(),
    "python_in_sandbox": sorted(p for p in os.listdir("/proc") if p.isdigit()
                                and b"python" in open(f"/proc/{p}/cmdline", "rb").read()
                                and int(p) != os.getpid()),
    "kill": attempt(lambda: os.kill(holder, signal.SIGKILL)),
    "stop": attempt(lambda: os.kill(holder, signal.SIGSTOP)),
    "environ": attempt(lambda: open(f"/proc/{holder}/environ", "rb").read()),
    "ptrace": libc.ptrace(16, holder, 0, 0),  # PTRACE_ATTACH: -1 when refused
}))
"""


def test_the_sandbox_holder_runs_no_python_and_the_kernel_cannot_touch_it(api: Client) -> None:
    """A forked kernel's sandbox is held by sleep (bwrap → setpriv → sh → sleep, no Python
    launcher) as uid nobody without any capability, under no_new_privs and the seccomp filter:
    the kernel (the sandbox uid) can neither signal, trace nor inspect it, and lives on."""
    name = create(api)
    assert probe(api, name)["ppid"] == 0  # forked
    out = console_text(run_to_end(api, "/session", name, HOLDER_PROBE), "stdout").strip()
    h = json.loads(out.splitlines()[-1])
    assert h["cmdline"][:2] == ["sleep", "infinity"], h
    assert h["uid"] == ["65534"] * 4 and h["gid"] == ["65534"] * 4 and h["groups"] == [], h
    assert all(int(v, 16) == 0 for v in h["caps"].values()), h["caps"]
    assert h["nnp"] == "1" and h["seccomp"] == "2", h
    assert h["python_in_sandbox"] == [], h  # only the kernel itself runs Python in there
    assert h["kill"] == "PermissionError" and h["stop"] == "PermissionError", h
    assert h["environ"] == "PermissionError" and h["ptrace"] == -1, h
    again = run_to_end(api, "/session", name, "print('still here')")
    assert "still here" in console_text(again, "stdout")
    api.delete(f"/session/{name}")


def test_forked_kernel_keeps_its_kernelspec_config_and_history(api: Client) -> None:
    """A forked kb-python kernel takes its command line's config from the template's parse
    (kernelspecs/_prebuilt.py): what kernel.json sets, it has; and this session's In, Out and
    %history work as in a cold kernel."""
    name = create(api)
    try:
        def run(code: str) -> str:
            return console_text(run_to_end(api, "/session", name, code), "stdout")

        seen = json.loads(run(
            "import json, os, sys\nip = get_ipython()\n"
            "print(json.dumps({'ppid': os.getppid(), 'stdout': type(sys.stdout).__name__,"
            " 'hist_file': str(ip.history_manager.hist_file), 'jedi': ip.Completer.use_jedi,"
            " 'connection_file': os.path.isfile(ip.kernel.parent.connection_file)}))").strip())
        assert seen == {"ppid": 0, "stdout": "ChunkedOutStream", "hist_file": ":memory:",
                        "jedi": False, "connection_file": True}  # its own, not the placeholder
        run("a = 41")
        run("a + 1")
        assert run("print(In[-2], Out[max(Out)], _i)").strip() == "a + 1 42 a + 1"
        history = run("%history -n")
        assert "a = 41" in history and "a + 1" in history, history
        assert "a = 41" in run("%history -l 5")  # from the session's database, in memory
    finally:
        api.delete(f"/session/{name}")


def fresh_probes(api: Client, n: int = 20) -> list[dict[str, Any]]:
    """Probes of ``n`` fresh kernels, each in a session of its own, four at a time."""
    def one(_: int) -> dict[str, Any]:
        name = create(api)
        try:
            return probe(api, name)
        finally:
            api.delete(f"/session/{name}")

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def test_random_state_differs_across_twenty_fresh_kernels(api: Client) -> None:
    probes = fresh_probes(api)
    assert all(p["ppid"] == 0 for p in probes), [p["ppid"] for p in probes]
    assert len({p["random"] for p in probes}) == 20
    assert len({p["uuid"] for p in probes}) == 20
    if probes[0]["numpy"] is not None:  # numpy in the kernel's environment
        assert len({p["numpy"] for p in probes}) == 20


def test_interrupt_restart_and_shutdown(srv: Server, api: Client) -> None:
    name = create(api)
    assert probe(api, name)["ppid"] == 0
    zygote = zygote_of(srv)
    kernels_before = {c.pid for c in zygote.children()}
    assert kernels_before

    body = {"mode": "query", "code": "import time\nprint('sleeping', flush=True)\n"
                                     "time.sleep(60)\nprint('woke')", "runId": None}
    r = api.post(f"/session/{name}", json=body)
    run_id = r.json()["result"]["runId"]
    time.sleep(1.0)
    assert api.post(f"/session/{name}/interrupt").status_code == 204
    results: list[dict[str, Any]] = []
    body = {"mode": "continue", "code": "", "runId": run_id}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = api.post(f"/session/{name}", json=body).json()["result"]
        results.append(result)
        if result["status"] == "finished":
            break
    assert results[-1]["status"] == "finished", results[-1]
    assert "KeyboardInterrupt" in console_text(results, "stderr")
    assert "woke" not in console_text(results, "stdout")

    assert api.patch(f"/session/{name}").status_code == 204  # restart: forked again
    assert probe(api, name)["ppid"] == 0
    kernels = {c.pid for c in zygote.children()}
    assert api.delete(f"/session/{name}").status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and kernels & {c.pid for c in zygote.children()}:
        time.sleep(0.1)
    assert not kernels & {c.pid for c in zygote.children()}  # shut down and reaped


def test_oom_kill_in_a_kernel_spares_the_zygote(srv: Server, api: Client) -> None:
    zygote = zygote_of(srv)
    name = create(api, limits={"maxMem": 128 * 1024})
    assert probe(api, name)["ppid"] == 0
    results = run_to_end(api, "/session", name,
                         "chunks = [b'x' * (1 << 20) for _ in range(1024)]\nprint('survived')")
    assert "survived" not in console_text(results, "stdout")
    assert zygote.is_running() and zygote.status() != psutil.STATUS_ZOMBIE
    assert zygote_of(srv).pid == zygote.pid  # the same zygote, still forking
    other = create(api)
    assert probe(api, other)["ppid"] == 0
    api.delete(f"/session/{name}")
    api.delete(f"/session/{other}")


def test_dead_zygote_means_cold_starts_then_a_new_zygote(srv: Server, api: Client) -> None:
    zygote = zygote_of(srv)
    zygote.send_signal(signal.SIGKILL)
    zygote.wait(10)
    name = create(api)  # nothing half-made in the way
    # Either is right: the server learns of the death from its socket's EOF, in its own time;
    # a fork sent before that fails and the kernel starts cold (1), one after goes to a new
    # zygote (0) unless the dead one started within the restart back-off (cold again).
    assert probe(api, name)["ppid"] in (0, 1)
    api.delete(f"/session/{name}")
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        name = create(api)
        seen.append(probe(api, name)["ppid"])
        api.delete(f"/session/{name}")
        if seen[-1] == 0:
            break
        time.sleep(1)
    assert seen[-1] == 0, seen  # a new zygote took over
    assert zygote_of(srv).pid != zygote.pid


def test_sigkilled_server_leaves_its_kernels_held_by_their_keepers() -> None:
    """Kernels are not children that die with the server (issue 15): after a kill -9 they run
    on, children of their zygote or keeper, which reap them (no zombie) and leave with the last
    one."""
    with run_server(zygote="on", pool_python="1") as s, s.client() as api:
        names = [create(api) for _ in range(2)]
        for n in names:
            assert probe(api, n)["ppid"] == 0
        server = psutil.Process(s.process.pid)
        tree = server.children(recursive=True)
        kernels = [p for p in tree if "ipykernel_launcher" in cmdline(p)]
        keepers = [p for p in tree if "kernelspecs._zygote" in cmdline(p)]
        assert len(kernels) >= 2 and any(p.name() == "bwrap" for p in tree)
        os.kill(s.process.pid, signal.SIGKILL)
        s.process.wait(10)
        time.sleep(1)
        for k in kernels:
            assert k.is_running() and k.status() != psutil.STATUS_ZOMBIE
            assert "kernelspecs._zygote" in " ".join(k.parent().cmdline())
        # Killed now, each is reaped by its keeper, and the keepers leave after their last.
        for k in kernels:
            k.kill()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(psutil.pid_exists(k.pid) for k in kernels):
            time.sleep(0.1)
        assert not any(psutil.pid_exists(k.pid) for k in kernels)
        # What else is left (pooled kernels, sandbox holders) goes with a sweep (next start).
        from bridge.ipc import IPC_ROOT, scope_of, sweep_ipc
        from bridge.sandbox import Sandbox

        # (as that data dir's next server would: a sweep judges only its own data dir's)
        sweep_ipc(set(), IPC_ROOT, Sandbox("on").cgroups, scope=scope_of(s.data_dir))
        _gone, alive = psutil.wait_procs([p for p in tree if p not in keepers], timeout=15)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        for k in keepers:  # exited (a zombie of whoever our init is, at most)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and k.is_running() and \
                    k.status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.1)
            # Gone, or a zombie until whoever our init is reaps it: both mean it exited.
            assert not k.is_running() or k.status() == psutil.STATUS_ZOMBIE


def test_only_plain_python_kernels_in_a_plain_environment_are_forked() -> None:
    import sys

    cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "c.json"]
    assert forkable(cmd, {"FOO": "1"})
    assert not forkable(cmd, {"LD_PRELOAD": "/x.so"})  # must act on the interpreter: cold
    assert not forkable(cmd, {"PYTHONHASHSEED": "0"})
    assert not forkable(["/usr/bin/node", "-m", "ipykernel_launcher"], {})
    assert not forkable([sys.executable, "-m", "some_other_kernel"], {})


def test_zygote_recycled_after_max_forks_and_its_kernels_live_on() -> None:
    with run_server(zygote="on", zygote_max_forks="2", pool_python="0") as s, s.client() as api:
        first = zygote_of(s)
        names = [create(api) for _ in range(2)]
        assert all(probe(api, n)["ppid"] == 0 for n in names)
        third = create(api)  # past max_forks: a fresh zygote forks it
        assert probe(api, third)["ppid"] == 0
        zygotes = zygotes_of(s)
        assert first.pid in {z.pid for z in zygotes} and len(zygotes) == 2
        # The retired zygote still reaps its kernels; they keep working.
        assert probe(api, names[0])["ppid"] == 0
        for n in names:
            api.delete(f"/session/{n}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and first.is_running() and \
                first.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.2)
        # It left: gone, or a zombie until the server's next look at its zygotes reaps it.
        assert not first.is_running() or first.status() == psutil.STATUS_ZOMBIE
        api.delete(f"/session/{third}")


# The probe must not hold the value it looks for: it gets the first half and a digest of the
# second, and reports a place where the first half is followed by the second.
SCAN = """
import hashlib
head, digest = {head!r}.encode(), {digest!r}
found = False
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
    for line in maps:
        addr, perms = line.split()[:2]
        if not perms.startswith("r"):
            continue
        lo, hi = (int(x, 16) for x in addr.split("-"))
        try:
            mem.seek(lo)
            data = mem.read(hi - lo)
        except (OSError, ValueError, OverflowError):
            continue
        at = data.find(head)
        while at >= 0 and not found:
            tail = data[at + len(head):at + 2 * len(head)]
            found = hashlib.sha256(tail).hexdigest() == digest
            at = data.find(head, at + 1)
print("FOUND" if found else "clean")
"""


def scan(secret: str) -> str:
    half = len(secret) // 2
    head, tail = secret[:half], secret[half:2 * half]
    return SCAN.format(head=head, digest=hashlib.sha256(tail.encode()).hexdigest())


def test_no_tenant_value_reaches_a_later_kernels_memory(srv: Server, api: Client) -> None:
    """Another tenant's environment goes to its own kernel only: the zygote never reads it,
    so no later kernel (forked from the zygote's memory) can find it in its own memory."""
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    first = create(api, config={"environ": {"TENANT_SECRET": secret}})
    assert probe(api, first)["ppid"] == 0
    later = create(api)
    assert probe(api, later)["ppid"] == 0
    out = console_text(run_to_end(api, "/session", later, scan(secret)), "stdout")
    assert out.strip() == "clean", out
    # The probe finds what is there: the first kernel sees its own variable.
    out = console_text(run_to_end(api, "/session", first, scan(secret)), "stdout")
    assert out.strip() == "FOUND", out
    api.delete(f"/session/{first}")
    api.delete(f"/session/{later}")


def test_python_env_kernels_fork_from_their_own_zygote_and_numpy_differs() -> None:
    """KB_PYTHON_ENV (an environment with numpy): Python kernels come from a zygote of that
    interpreter, and numpy's global RNG differs across fresh kernels like random's."""
    env = ROOT / ".venv-datascience"
    assert (env / "bin" / "python").exists(), "run `make datascience-env`"
    with run_server(zygote="on", pool_python="0", python_env=str(env)) as s, s.client() as api:
        probes = fresh_probes(api)
        assert all(p["ppid"] == 0 for p in probes), [p["ppid"] for p in probes]
        assert all(p["numpy"] is not None for p in probes)  # the environment's numpy
        assert len({p["numpy"] for p in probes}) == 20
        assert len({p["random"] for p in probes}) == 20
        zygotes = zygotes_of(s)
        assert any(str(env) in z.cmdline()[0] for z in zygotes), [z.cmdline() for z in zygotes]
