"""Hostile tenants (issue 11, the sandbox wall): an attacker tenant and a victim tenant against one
real server, each check done the way the security review broke it (shared/reference/
security-review.md, F1–F3).

* F1: whatever environment a client sends, in any dialect, no loader or shell start-up variable
  runs code outside the sandbox: a library that writes a marker file when loaded, compiled into a
  host temp dir or uploaded into a session dir whose host path is known, never writes it.
* F2: new namespaces and mounts are refused by the seccomp filter, so a capped session cannot
  lift its memory cap.
* F3: keyrings are out of reach; kernels run as an unprivileged host uid with no capabilities;
  ``/proc/1/cmdline`` shows no host path; uploads stay usable by that uid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyseccomp
import pytest

from bridge.doctor import cgroups
from bridge.sandbox import HOLDER_UID

from .support import (
    ROOT,
    Client,
    Server,
    console_text,
    create_session,
    free_port,
    run_server,
    run_to_end,
)

SANDBOX_UID = 60000  # the default of KB_SANDBOX_UID
ARCH = pyseccomp.system_arch()
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x02000000, 0x10000000, 0x20000000, 0x40000000)
EPERM, ENOSYS = 1, 38

EVIL_C = r"""
#include <stdio.h>
#include <unistd.h>
/* Runs when the library is loaded: on the host it could write MARKER; inside the sandbox the
   host path does not exist, and /home/work/inside-marker records who loaded it. */
__attribute__((constructor)) static void loaded(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fprintf(f, "uid=%d pid=%d\n", (int)getuid(), (int)getpid()); fclose(f); }
    f = fopen("/home/work/inside-marker", "a");
    if (f) { fprintf(f, "uid=%d\n", (int)getuid()); fclose(f); }
}
unsigned int la_version(unsigned int v) { return v; }  /* accepted as an LD_AUDIT module */
"""


def nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(ARCH, name))


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with run_server(pool_python="0") as s:
        yield s


@pytest.fixture(scope="module")
def attacker(srv: Server) -> Iterator[Client]:
    _, secret = srv.new_keypair()
    with srv.client(secret) as c:
        yield c


@pytest.fixture(scope="module")
def victim(srv: Server) -> Iterator[Client]:
    _, secret = srv.new_keypair()
    with srv.client(secret) as c:
        yield c


def create(api: Client, lang: str = "python", **body: Any) -> str:
    return create_session(api, "hostile", lang, **body)


def run(api: Client, name: str, code: str) -> tuple[str, str, int | None]:
    results = run_to_end(api, "/session", name, code)
    return (console_text(results, "stdout"), console_text(results, "stderr"),
            results[-1]["exitCode"])


def last_json(out: str) -> Any:
    return json.loads(out.strip().splitlines()[-1])


# -- F1: hostile loader and shell variables, every dialect ---------------------------------------


class Bait:
    """A marker-writing library and script, in a host temp dir and uploaded to a session."""

    def __init__(self, host_dir: Path, uploaded_dir: Path, stash: str) -> None:
        self.host_dir, self.uploaded_dir, self.stash = host_dir, uploaded_dir, stash

    @property
    def markers(self) -> list[Path]:
        return sorted(self.host_dir.glob("marker-*"))

    def environments(self) -> list[dict[str, str]]:
        """Every variable pointing at the host copies, then at the uploaded ones."""
        out = []
        for where in (self.host_dir, self.uploaded_dir):
            out.append({
                "LD_PRELOAD": f"{where}/evil.so",
                "LD_AUDIT": f"{where}/evil.so",
                "BASH_ENV": f"{where}/evil.sh",
                "ENV": f"{where}/evil.sh",
                # Also read by jupyter_client on the host: harmless data, never a path loaded.
                "JPY_SESSION_NAME": f"{where}/evil.sh",
                "KERNEL_LD_PRELOAD": f"{where}/evil.so",
            })
        return out


@pytest.fixture(scope="module")
def bait(srv: Server, attacker: Client) -> Iterator[Bait]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (make toolchains): cannot build the hostile library")
    host_dir = Path(tempfile.mkdtemp(prefix="kb-hostile-"))
    host_dir.chmod(0o777)  # a marker from any host process, whatever its uid, would land here
    (host_dir / "evil.c").write_text(EVIL_C)
    subprocess.run([gcc, "-shared", "-fPIC", f'-DMARKER="{host_dir}/marker-so"', "-o",
                    str(host_dir / "evil.so"), str(host_dir / "evil.c")], check=True)
    (host_dir / "evil.sh").write_text(f'echo "uid=$(id -u)" >> {host_dir}/marker-sh\n')
    # The attacker's stash: a session whose dir holds the same files; its host path is known
    # (here from the data dir; in the review, from /proc/self/mountinfo).
    stash = create(attacker)
    parts = [("src", (n, (host_dir / n).read_bytes(), "application/octet-stream"))
             for n in ("evil.so", "evil.sh")]
    assert attacker.post(f"/session/{stash}/upload", files=parts).status_code == 204
    found = list((srv.data_dir / "sessions").glob("*/evil.so"))
    assert len(found) == 1, found
    yield Bait(host_dir, found[0].parent, stash)
    attacker.delete(f"/session/{stash}")
    shutil.rmtree(host_dir, ignore_errors=True)


CHILDREN = ("import subprocess\n"
            "subprocess.run(['/bin/sh', '-c', 'true']); subprocess.run(['/bin/bash', '-c', 'true'])\n"
            "print(6 * 7)")


def test_backendai_environ_never_runs_host_side(attacker: Client, bait: Bait) -> None:
    for env in bait.environments():
        for lang, code in (("python", CHILDREN), ("bash", "bash -c true; echo $((6 * 7))")):
            name = create(attacker, lang, config={"environ": env})
            try:
                out, _, code_ = run(attacker, name, code)
                assert out.strip().endswith("42") and code_ == 0, (lang, out)
                assert bait.markers == [], [m.read_text() for m in bait.markers]
            finally:
                attacker.delete(f"/session/{name}")


def test_sandbox_environment_never_runs_host_side(attacker: Client, bait: Bait) -> None:
    c_main = '#include <stdio.h>\nint main(void) { printf("%d\\n", 6 * 7); return 0; }'
    for env in bait.environments():
        # python applies it per execution, in the kernel; C starts a kernel with it.
        for lang, code in (("python", CHILDREN), ("c", c_main)):
            r = attacker.post("/api/v1/execute", json={"code": code, "language": lang,
                                                        "environment": env, "timeout": 60})
            assert r.status_code == 200, r.text
            assert r.json()["stdout"].strip().endswith("42"), r.json()
            assert bait.markers == [], [m.read_text() for m in bait.markers]


def test_job_environment_never_runs_host_side(attacker: Client, bait: Bait) -> None:
    def job_result(sid: str, **body: Any) -> dict[str, Any]:
        r = attacker.post(f"/api/v1/sessions/{sid}/jobs", json={"code": CHILDREN, **body})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = attacker.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed", "cancelled"):
                return dict(job)
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish")

    for env in bait.environments():
        dedicated = attacker.post("/api/v1/sessions", json={"mode": "dedicated",
                                                            "environment": env}).json()["id"]
        batch = attacker.post("/api/v1/sessions", json={"mode": "batch"}).json()["id"]
        for job in (job_result(dedicated), job_result(batch, environment=env)):
            assert job["status"] == "completed" and job["stdout"].strip() == "42", job
        assert bait.markers == [], [m.read_text() for m in bait.markers]
        for sid in (dedicated, batch):
            attacker.delete(f"/api/v1/sessions/{sid}")


def test_jupyter_env_never_runs_host_side(attacker: Client, bait: Bait) -> None:
    for env in bait.environments():
        r = attacker.post("/api/kernels", json={"name": "python3", "env": env})
        assert r.status_code == 201, r.text
        kid = r.json()["id"]
        try:
            out, _, _ = run(attacker, kid, CHILDREN)  # a Jupyter kernel is a session
            assert out.strip().endswith("42"), out
            assert bait.markers == [], [m.read_text() for m in bait.markers]
        finally:
            attacker.delete(f"/api/kernels/{kid}")


def test_client_environment_applies_inside_as_the_sandbox_uid(attacker: Client,
                                                              bait: Bait) -> None:
    """The variables do reach the kernel: inside, unprivileged, where they harm nobody."""
    name = create(attacker, config={"environ": {"LD_PRELOAD": "/home/work/evil.so"}})
    try:
        so = (bait.host_dir / "evil.so").read_bytes()
        parts = [("src", ("evil.so", so, "application/octet-stream"))]
        assert attacker.post(f"/session/{name}/upload", files=parts).status_code == 204
        out, _, _ = run(attacker, name, "import os, subprocess\n"
                                        "print(os.environ['LD_PRELOAD'])\n"
                                        "subprocess.run(['/bin/true'])\n"
                                        "print(open('/home/work/inside-marker').read())")
        assert "/home/work/evil.so" in out and f"uid={SANDBOX_UID}" in out, out
        assert bait.markers == []
    finally:
        attacker.delete(f"/session/{name}")


# -- F2/F3: the seccomp filter, keyrings, capabilities -------------------------------------------


SYSCALL_PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *args)
    if r == 0 and nr == {clone}:
        os._exit(0)  # a clone that worked: the child leaves at once
    return ctypes.get_errno() if r == -1 else 0
"""


def test_namespaces_mounts_and_kernel_surfaces_refused(attacker: Client) -> None:
    name = create(attacker)
    try:
        code = SYSCALL_PROBE.format(clone=nr("clone")) + f"""
out = {{
  "unshare": call({nr("unshare")}, {CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP}),
  "unshare_net": call({nr("unshare")}, {CLONE_NEWNET}),
  "clone_user": call({nr("clone")}, {CLONE_NEWUSER | 17}, 0, 0, 0, 0),
  "clone_pid": call({nr("clone")}, {CLONE_NEWPID | 17}, 0, 0, 0, 0),
  "clone3": call({nr("clone3")}, 0, 0),
  "setns": call({nr("setns")}, 0, 0),
  "mount": call({nr("mount")}, b"none", b"/tmp", b"tmpfs", 0, 0),
  "umount2": call({nr("umount2")}, b"/proc", 2),
  "bpf": call({nr("bpf")}, 0, 0, 0),
  "perf_event_open": call({nr("perf_event_open")}, 0, 0, -1, -1, 0),
  "io_uring_setup": call({nr("io_uring_setup")}, 8, 0),
  "userfaultfd": call({nr("userfaultfd")}, 0),
  "ptrace": call({nr("ptrace")}, 0, 0, 0, 0),
  "keyctl": call({nr("keyctl")}, 0, -4, 0),
}}
import subprocess, threading
t = threading.Thread(target=lambda: None); t.start(); t.join()
out["fork_and_threads"] = subprocess.run(["/bin/echo", "ok"], capture_output=True,
                                         text=True).stdout.strip()
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines()
              if ":\\t" in l)
for k in ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
          "Seccomp"):
    out[k] = status[k].split()
print(json.dumps(out))
"""
        out, _, _ = run(attacker, name, code)
        got = last_json(out)
        expected_errno = {k: EPERM for k in got if k not in
                          ("clone3", "fork_and_threads", "Uid", "Gid", "CapInh", "CapPrm",
                           "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}
        assert {k: got[k] for k in expected_errno} == expected_errno, got
        assert got["clone3"] == ENOSYS  # so libcs fall back to clone, whose flags are checked
        assert got["fork_and_threads"] == "ok"
        assert got["Uid"] == [str(SANDBOX_UID)] * 4 and got["Gid"] == [str(SANDBOX_UID)] * 4
        assert all(got[k] == ["0000000000000000"]
                   for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), got
        assert got["NoNewPrivs"] == ["1"] and got["Seccomp"] == ["2"], got
    finally:
        attacker.delete(f"/session/{name}")


def test_capped_session_cannot_lift_its_cap(attacker: Client) -> None:
    """F2: unshare a user + cgroup + mount namespace, mount the memory hierarchy, raise the
    limit, then allocate 700 MiB under a 256 MiB cap."""
    cap_kib = 256 * 1024
    name = create(attacker, limits={"maxMem": cap_kib})
    try:
        code = SYSCALL_PROBE.format(clone=nr("clone")) + f"""
tried = {{"unshare": call({nr("unshare")}, {CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWCGROUP})}}
os.makedirs("/tmp/cg", exist_ok=True)
tried["mount"] = call({nr("mount")}, b"cgroup", b"/tmp/cg", b"cgroup", 0, b"memory")
for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max",
             "/sys/fs/cgroup/pids/pids.max"):
    try:
        with open(path, "w") as f:
            f.write("-1")
        tried[path] = "written"
    except OSError as exc:
        tried[path] = exc.errno
print(json.dumps(tried), flush=True)
chunks = [b"x" * (1 << 20) for _ in range(700)]
print("allocated", len(chunks))
"""
        out, err, exit_code = run(attacker, name, code)
        tried = json.loads(out.strip().splitlines()[0])
        assert tried["unshare"] == EPERM and tried["mount"] == EPERM, tried
        assert "written" not in tried.values(), tried
        assert "allocated 700" not in out
        if cgroups().verdict == "ok":  # the cgroup's OOM killer ends the kernel
            assert exit_code == 130, (out[-300:], err[-300:], exit_code)
        else:  # RLIMIT_AS alone: the allocation itself fails inside the program
            assert "MemoryError" in err, (out[-300:], err[-300:], exit_code)
    finally:
        attacker.delete(f"/session/{name}")


def test_keys_of_one_tenant_unreachable_from_another(attacker: Client, victim: Client) -> None:
    """F3: add_key in the attacker's kernel fails; the victim's request_key finds nothing."""
    a, b = create(attacker), create(victim)
    try:
        add = SYSCALL_PROBE.format(clone=nr("clone")) + (
            f'print(json.dumps(call({nr("add_key")}, b"user", b"kb-hostile", b"secret", 6, -4)))')
        find = SYSCALL_PROBE.format(clone=nr("clone")) + (
            f'print(json.dumps(call({nr("request_key")}, b"user", b"kb-hostile", None, 0)))')
        assert last_json(run(attacker, a, add)[0]) == EPERM
        assert last_json(run(victim, b, find)[0]) == EPERM  # not "found" (0)
    finally:
        attacker.delete(f"/session/{a}")
        victim.delete(f"/session/{b}")


# -- host view: uids, command lines, files -------------------------------------------------------


def test_kernel_processes_never_root_on_the_host(srv: Server, attacker: Client) -> None:
    """Every process of every kernel (python, a process kernel, the batch bash kernel and what
    user code starts), seen from the host, is the sandbox uid with no capability in any set;
    only bubblewrap itself is root (and holds none either), and a forked kernel's sandbox
    holder is uid nobody (neither root nor the tenant's, also without any)."""
    py = create(attacker)
    langs = ["python"]
    c = None
    if shutil.which("gcc"):
        c = create(attacker, "c")
        langs.append("c")
    try:
        run(attacker, py, "import subprocess\n"
                          "p = subprocess.Popen(['sleep', '60'])")
        if c is not None:
            results = run_to_end(attacker, "/session", c, "", mode="batch",
                                 options={"build": "", "exec": "sleep 60 &"})
            assert results[-1]["status"] == "finished", results[-1]
        tree = psutil.Process(srv.process.pid).children(recursive=True)
        kernels = {"ipykernel": 0, "compiled_kernel": 0, "bash_kernel": 0, "sleep": 0}
        for p in tree:
            try:
                with p.oneshot():
                    cmd, uids, pname = " ".join(p.cmdline()), p.uids(), p.name()
            except psutil.Error:  # gone (or a zombie) meanwhile
                continue
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                continue
            caps = {k: v.strip() for k, _, v in (line.partition(":") for line in
                                                  status.splitlines()) if k.startswith("Cap")}
            if "kernelspecs._zygote" in cmd:  # the fork-server: host side, like the server
                continue
            if pname == "bwrap":  # the sandbox tool: root, but without any capability left
                assert caps["CapEff"] == caps["CapPrm"] == "0000000000000000", (cmd, caps)
                continue
            if cmd == "sleep infinity" and uids.real == HOLDER_UID:  # bridge/sandbox.py
                assert set(uids) == {HOLDER_UID}, (cmd, uids)
                assert set(caps.values()) == {"0000000000000000"}, (cmd, caps)
                continue
            assert 0 not in uids and uids.real == SANDBOX_UID, (cmd, uids)
            assert set(caps.values()) == {"0000000000000000"}, (cmd, caps)
            for key in kernels:
                if key in cmd:
                    kernels[key] += 1
        assert kernels["ipykernel"] and kernels["sleep"], kernels
        if c is not None:
            assert kernels["compiled_kernel"] and kernels["bash_kernel"], kernels
    finally:
        for name in filter(None, (py, c)):
            attacker.delete(f"/session/{name}")


def test_proc_1_cmdline_shows_no_host_path_and_conn_file_is_read_only(srv: Server, attacker: Client) -> None:
    name = create(attacker)
    try:
        out, _, _ = run(attacker, name, """
import json, os
from ipykernel import get_connection_file
conn = get_connection_file()
try:
    open(conn, "a").close()
    rewritten = "yes"
except OSError as exc:
    rewritten = exc.strerror
print(rewritten, os.access(conn, os.R_OK), os.access(os.path.dirname(conn), os.W_OK))
print(json.dumps(open('/proc/1/cmdline').read().split('\\0')))
""")
        # The kernel reads its connection file, but cannot rewrite or replace it.
        assert out.splitlines()[0] == "Permission denied True False", out
        args = [a for a in last_json(out) if a]
        assert args[0] == "bwrap" and "--args" in args, args
        host_paths = [str(srv.data_dir), str(ROOT), sys.prefix, os.path.realpath(sys.prefix),
                      sys.base_prefix, tempfile.gettempdir()]
        leaked = [a for a in args for h in host_paths if h in a]
        assert leaked == [], leaked
    finally:
        attacker.delete(f"/session/{name}")


def test_uploads_usable_by_user_code_and_its_files_downloadable(srv: Server,
                                                               attacker: Client) -> None:
    name = create(attacker)
    try:
        parts = [("src", ("notes.txt", b"first\n", "text/plain")),
                 ("src", ("sub%2Fold.txt", b"old\n", "text/plain"))]
        assert attacker.post(f"/session/{name}/upload", files=parts).status_code == 204
        out, err, _ = run(attacker, name, """
import os
with open("notes.txt", "a") as f:
    f.write("second\\n")
os.remove("sub/old.txt")
with open("sub/new.txt", "w") as f:
    f.write("made by user code\\n")
os.chmod("notes.txt", 0o600)
print(open("notes.txt").read().split(), os.listdir("sub"), os.getuid())
""")
        assert out.strip() == f"['first', 'second'] ['new.txt'] {SANDBOX_UID}", (out, err)
        r = attacker.get(f"/session/{name}/download_single", params={"file": "sub/new.txt"})
        assert r.status_code == 200 and r.content == b"made by user code\n"
        r = attacker.get(f"/session/{name}/download_single", params={"file": "notes.txt"})
        assert r.status_code == 200 and r.content == b"first\nsecond\n"
        workdirs = [p for p in (srv.data_dir / "sessions").iterdir()
                    if (p / "sub" / "new.txt").exists()]
        assert len(workdirs) == 1
        for p in (workdirs[0], workdirs[0] / "sub", workdirs[0] / "notes.txt"):
            assert p.stat().st_uid == SANDBOX_UID, p
    finally:
        attacker.delete(f"/session/{name}")


def test_serve_refuses_an_ipc_root_others_can_enter(tmp_path: Path) -> None:
    """Whoever made the IPC root first would hold every kernel's key: the server says so and
    stops (exit 2) instead of using it."""
    bad = tmp_path / f"kb-ipc-{os.getuid()}"
    bad.mkdir()
    bad.chmod(0o777)
    argv = [sys.executable, "-m", "api.cli", "serve", "--data-dir", str(tmp_path / "data"),
            "--port", str(free_port())]
    env = {**os.environ, "TMPDIR": str(tmp_path), "KB_POOL_PYTHON": "0"}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert f"IPC root: {bad} has mode drwxrwxrwx, not drwx------" in r.stderr, r.stderr[-500:]
    # --unsafe skips the start-up checks; the launch itself still refuses every kernel.
    port = free_port()
    proc = subprocess.Popen([*argv[:-1], str(port), "--unsafe"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, ""):
            if "listening on" in line:
                break
        keys = json.loads(subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", "create", "--data-dir",
             str(tmp_path / "data"), "--json"], capture_output=True, text=True, check=True,
            cwd=ROOT).stdout)
        with Client(f"http://127.0.0.1:{port}", keys["secret_key"]) as c:
            r2 = c.post("/session", json={"lang": "python", "name": "refused"})
        assert r2.status_code == 503 and f"IPC root {bad}" in r2.text, (r2.status_code, r2.text)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert (bad.stat().st_mode & 0o777) == 0o777  # refused, not silently repaired


def test_ipc_root_refused_when_not_private(tmp_path: Path) -> None:
    bad = tmp_path / "kb-ipc"
    bad.mkdir(mode=0o755)
    bad.chmod(0o755)
    from bridge.kernels import ipc_root
    from bridge.sandbox import SandboxUnavailable

    with pytest.raises(SandboxUnavailable, match="drwxr-xr-x"):
        ipc_root(bad)
    bad.chmod(0o700)
    os.chown(bad, 12345, 12345)
    with pytest.raises(SandboxUnavailable, match="owned by uid 12345"):
        ipc_root(bad)
    link = tmp_path / "kb-ipc-link"
    link.symlink_to(tmp_path)
    with pytest.raises(SandboxUnavailable, match="not a directory"):
        ipc_root(link)
    fresh = tmp_path / "kb-ipc-fresh"
    assert ipc_root(fresh) == fresh and (fresh.stat().st_mode & 0o777) == 0o700
