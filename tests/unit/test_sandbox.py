"""The sandbox's pieces on their own: bwrap argv run for real, cgroups on this machine, the masks.

The end-to-end checks (through the server, from inside sessions) are in test_isolation.py.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bridge.binds import Bind, toolchain_binds, unreadable_entries
from bridge.cgroups import Cgroups, _mounts, _own_paths
from bridge.sandbox import (
    HOLDER_UID,
    HOST_ENV,
    RLIMIT_AS_SLACK,
    Confinement,
    HostLaunch,
    Sandbox,
    base_environ,
)


def conf(tmp: Path, **kw: object) -> Confinement:
    work, ipc = tmp / "work", tmp / "ipc"
    work.mkdir(exist_ok=True)
    ipc.mkdir(exist_ok=True)
    return Confinement(workdir=work, ipc_dir=ipc, **kw)  # type: ignore[arg-type]


def sh(sandbox: Sandbox, c: Confinement, script: str, cgroup: object = None) -> str:
    """Run a bash script the way the provisioner starts a kernel, as the sandbox uid."""
    sandbox.hand_over(c)
    launch = sandbox.host_launch(["/bin/bash", "-c", script], c, sandbox.kernel_environ(c))
    try:
        out = subprocess.run(launch.argv, executable=launch.executable, env=launch.env,
                             pass_fds=launch.fds, cwd="/", capture_output=True, text=True,
                             timeout=60, preexec_fn=sandbox.preexec(c, cgroup))  # type: ignore[arg-type]
    finally:
        launch.close()
    return out.stdout


def bwrap_options(sandbox: Sandbox, c: Confinement) -> list[str]:
    """The options bwrap reads from its --args descriptor."""
    launch = sandbox.host_launch(["x"], c, {})
    try:
        fd = int(launch.argv[launch.argv.index("--args") + 1])
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1 << 20).decode().split("\0")[:-1]
    finally:
        launch.close()


def test_unreadable_entries_follow_the_others_bits(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "public").write_text("x")
    (tmp_path / "open" / "secret").write_text("x")
    (tmp_path / "open" / "secret").chmod(0o640)
    (tmp_path / "closed").mkdir(mode=0o750)
    (tmp_path / "closed" / "inner").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "open" / "secret")
    dirs, files = unreadable_entries(str(tmp_path))
    assert dirs == [str(tmp_path / "closed")]  # and nothing below it is listed twice
    assert files == [str(tmp_path / "open" / "secret")]


def test_argv_masks_hidden_paths_and_host_secrets(tmp_path: Path) -> None:
    """A data dir placed under a bound tree is an empty dir inside; /etc/shadow is empty."""
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "data" / "kernel-bridge.sqlite3").write_text("secret-key-material")
    (tree / "tool.txt").write_text("visible\n")
    sandbox = Sandbox("auto", hide=(tree / "data",))
    sandbox.binds.append(Bind(str(tree), str(tree)))  # as if a toolchain lived there
    c = conf(tmp_path)
    out = sh(sandbox, c, f"cat {tree}/tool.txt; ls -A {tree}/data | wc -l; "
                         f"cat /etc/shadow 2>/dev/null | wc -c; touch /etc/x {tree}/x 2>&1 | wc -l")
    assert out.split() == ["visible", "0", "0", "2"], out


def test_argv_network_proc_and_root(tmp_path: Path) -> None:
    sandbox = Sandbox("auto")
    c = conf(tmp_path)
    script = ("cat /proc/sys/kernel/hostname; echo 1 > /proc/sys/vm/drop_caches && echo W; "
              "touch /new 2>/dev/null && echo W; touch /home/work/f /tmp/f && echo ok; "
              "ls /sys 2>/dev/null | wc -l; ls /sys/class/net 2>/dev/null; ls /proc | grep -c '^[0-9]'")
    out = sh(sandbox, c, script).split()
    assert out[0] == "sandbox" and "W" not in out and "ok" in out, out
    assert (tmp_path / "work" / "f").exists()
    # no /sys at all; processes: bwrap's init, bash, ls, grep
    assert out[-2:] == ["0", "4"], out
    assert "--unshare-net" in bwrap_options(sandbox, c)
    assert "--unshare-net" not in bwrap_options(sandbox, conf(tmp_path, network=True))


def test_read_only_mounts_are_read_only(tmp_path: Path) -> None:
    from bridge.sandbox import Mount

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in").write_text("data\n")
    sandbox = Sandbox("auto")
    c = conf(tmp_path, mounts=(Mount(shared, "ro", read_only=True), Mount(shared, "rw")))
    out = sh(sandbox, c, "cat ro/in; touch ro/x 2>/dev/null || echo refused; touch rw/y && echo ok")
    assert out.split() == ["data", "refused", "ok"]


def test_toolchains_outside_usr_bound_without_their_homes(tmp_path: Path) -> None:
    binds, path = toolchain_binds()
    for b in binds:
        assert not b.src.startswith(("/usr/", "/etc/"))
        assert "/.cargo" not in b.src  # rustup's proxies (and cargo's credentials) stay out
    rustc = shutil.which("rustc")
    if rustc and os.path.realpath(rustc).endswith("rustup"):
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        assert Bind(sysroot, sysroot) in binds and f"{sysroot}/bin" in path
    sandbox = Sandbox("auto")
    c = conf(tmp_path)
    tools = [t for t in ("rustc", "go", "node", "javac", "ruby", "gcc") if shutil.which(t)]
    out = sh(sandbox, c, " && ".join(f"command -v {t} >/dev/null" for t in tools) +
             " && echo found; ls -A /root")
    assert out.split()[0] == "found", out
    # Only the toolchain dirs the language table needs: no dotfiles of root's home.
    visible = set(out.split()[1:])
    assert visible <= {".rustup", ".pyenv"}, visible


def test_host_side_gets_nothing_of_the_client(tmp_path: Path) -> None:
    """bwrap's environment and argv are the fixed ones, whatever the client asked for; the
    variables arrive inside, after the drop to the sandbox uid."""
    hostile = {"LD_PRELOAD": "/x/evil.so", "BASH_ENV": "/x/evil.sh", "PYTHONPATH": "/x/py",
               "MARK": "inside"}
    sandbox = Sandbox("auto")
    c = conf(tmp_path, environ=hostile)
    launch = sandbox.host_launch(["/bin/true"], c, sandbox.kernel_environ(c))
    try:
        assert launch.env == dict(HOST_ENV)
        assert not any("/x/" in a for a in launch.argv), launch.argv
    finally:
        launch.close()
    assert not any("/x/" in a for a in bwrap_options(sandbox, c))
    out = sh(sandbox, c, "echo $MARK $BASH_ENV; id -u; grep -E '^(Cap[a-zA-Z]+|NoNewPrivs|Seccomp):' "
                         "/proc/self/status | awk '{print $2}' | sort -u | tr '\\n' ' '")
    lines = out.splitlines()
    assert lines[0] == "inside /x/evil.sh" and lines[1] == str(sandbox.uid), out
    assert lines[2].split() == ["0000000000000000", "1", "2"], out  # no caps, nnp, filter


def options_of(launch: HostLaunch) -> list[str]:
    """bwrap's options from its --args descriptor, descriptor numbers left out."""
    fd = int(launch.argv[launch.argv.index("--args") + 1])
    os.lseek(fd, 0, os.SEEK_SET)
    options = os.read(fd, 1 << 20).decode().split("\0")[:-1]
    os.lseek(fd, 0, os.SEEK_SET)  # for bwrap, should the launch run
    return [o for o in options if not o.isdigit()]


def test_the_holder_gets_the_kernels_sandbox_runs_no_python_and_drops_to_nobody(
        tmp_path: Path) -> None:
    """A forked kernel's sandbox holder: the very sandbox a cold kernel of the same confinement
    gets, held by sleep as uid nobody with no capability, no_new_privs and the seccomp filter,
    after one line on its stdout (when every mount is made)."""
    sandbox = Sandbox("auto")
    c = conf(tmp_path)
    sandbox.hand_over(c)
    cold, holder = sandbox.host_launch(["/bin/true"], c, {}), sandbox.holder_launch(c)
    try:
        assert options_of(holder) == options_of(cold)
        payload = holder.argv[holder.argv.index("--") + 1:]
        assert payload[0].endswith("setpriv") and f"--reuid={HOLDER_UID}" in payload, payload
        assert not any("python" in a or "enter.py" in a for a in payload), payload
        assert holder.env == dict(HOST_ENV)
        proc = subprocess.Popen(holder.argv, executable=holder.executable, env=holder.env,
                                pass_fds=holder.fds, cwd="/", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=sandbox.preexec(c, None))
    finally:
        cold.close()
        holder.close()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == b"\n", proc.stderr.read()
        sleeper = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.name() == "sleep"]
        assert len(sleeper) == 1, sleeper
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{sleeper[0].pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert status["Uid"].split() == [str(HOLDER_UID)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(HOLDER_UID)] * 4 and not status["Groups"].split()
        assert all(int(status[k], 16) == 0 for k in status if k.startswith("Cap")), status
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    finally:
        proc.kill()
        proc.wait()


def test_environ_from_scratch() -> None:
    env = base_environ({"KB_SECRET": "x", "PYTHONPATH": "/home/work/lib", "A": "1"},
                       ["/opt/tc/bin"], "/opt/kernel-bridge")
    assert "KB_SECRET" not in env and env["A"] == "1"
    assert env["PYTHONPATH"] == "/opt/kernel-bridge:/home/work/lib"
    assert env["PATH"].split(":")[1] == "/opt/tc/bin" and env["HOME"] == "/home/work"
    assert not any(k in env for k in ("SSH_AUTH_SOCK", "KB_DATA_DIR"))


def test_rlimit_as_only_without_a_memory_cgroup(tmp_path: Path) -> None:
    sandbox = Sandbox("auto", cgroups=Cgroups("none", {}))
    c = conf(tmp_path, mem_bytes=64 << 20)
    probe = [sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"]
    out = subprocess.run(probe, capture_output=True, text=True, check=True,
                         preexec_fn=sandbox.preexec(c, None)).stdout
    assert int(out) == (64 << 20) + RLIMIT_AS_SLACK
    off = Sandbox("off")
    out = subprocess.run(probe, capture_output=True, text=True, check=True,
                         preexec_fn=off.preexec(c, None)).stdout
    assert int(out) == resource.RLIM_INFINITY


# -- cgroups ------------------------------------------------------------------------------------


def test_parse_proc_cgroup_and_mountinfo() -> None:
    own = _own_paths("4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/user.slice\n")
    assert own == {"memory": "/process_api/abc", "cpu": "/", "cpuacct": "/", "": "/user.slice"}
    mounts = _mounts(
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "20 1 0:3 / /proc rw - proc proc rw\n")
    assert mounts["memory"] == (Path("/sys/fs/cgroup/memory"), "/")
    assert mounts["cpuacct"] == mounts["cpu"] and mounts[""][0] == Path("/sys/fs/cgroup/unified")


def test_v2_detected_and_written_on_a_delegated_tree(tmp_path: Path) -> None:
    """cgroup v2 is not writable on this machine: check the files it would write."""
    fs, proc = tmp_path / "cg", tmp_path / "proc"
    (fs / "svc").mkdir(parents=True)
    proc.mkdir()
    (fs / "svc" / "cgroup.controllers").write_text("cpu memory pids\n")
    (fs / "svc" / "cgroup.subtree_control").write_text("\n")
    (proc / "cgroup").write_text("0::/svc\n")
    (proc / "mountinfo").write_text(f"41 31 0:38 / {fs} rw - cgroup2 cgroup2 rw\n")
    cg = Cgroups.detect(proc)
    assert cg.version == "v2" and cg.parents == {"": fs / "svc" / "kernel-bridge"}
    assert (fs / "svc" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    k = cg.create("k1", 100 << 20, 32)
    d = fs / "svc" / "kernel-bridge" / "k1"
    assert (d / "memory.max").read_text() == str(100 << 20)
    assert (d / "memory.swap.max").read_text() == "0" and (d / "pids.max").read_text() == "32"
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    assert k.cpu_seconds() == 2.5


def test_v2_refused_without_memory_controller(tmp_path: Path) -> None:
    fs, proc = tmp_path / "cg", tmp_path / "proc"
    fs.mkdir()
    proc.mkdir()
    (fs / "cgroup.controllers").write_text("hugetlb\n")  # this machine's cgroup2
    (proc / "cgroup").write_text("0::/\n")
    (proc / "mountinfo").write_text(f"41 31 0:38 / {fs} rw - cgroup2 cgroup2 rw\n")
    assert Cgroups.detect(proc).version == "none"


@pytest.fixture
def host_cgroups() -> Cgroups:
    cg = Cgroups.detect()
    assert cg.enabled, "this machine has writable cgroups (feasibility.md §5)"
    return cg


def test_real_cgroup_caps_processes_and_memory_then_goes(host_cgroups: Cgroups) -> None:
    name = f"unit-{os.getpid()}"
    k = host_cgroups.create(name, 64 << 20, 16)
    try:
        code = ("import subprocess\nps = []\ntry:\n    for _ in range(64):\n"
                "        ps.append(subprocess.Popen(['sleep', '30']))\n"
                "except OSError as e:\n    print(len(ps), type(e).__name__, flush=True)\n"
                "for p in ps:\n    p.kill(); p.wait()\n"
                "x = [b'x' * (1 << 20) for _ in range(256)]\nprint('survived')")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, preexec_fn=k.join)
        started, err = p.stdout.split()[:2]
        assert int(started) < 16 and err == "BlockingIOError"
        assert p.returncode == -9 and "survived" not in p.stdout and k.oom_kills() == 1
        cpu = k.cpu_seconds()
        assert cpu is not None and cpu > 0
        mem = k.memory()
        assert mem is not None and 32 << 20 < mem[1] <= 64 << 20  # the peak hit the cap
    finally:
        for _ in range(40):
            if k.remove():
                break
            time.sleep(0.05)
    assert not any(d.exists() for d in k.dirs.values())


def test_sweep_removes_only_old_empty_cgroups_and_a_swept_one_comes_back(
        host_cgroups: Cgroups) -> None:
    names = [f"unit-sweep-{os.getpid()}-{i}" for i in range(3)]
    groups = [host_cgroups.create(n, 32 << 20, 8) for n in names]
    sleeper = subprocess.Popen(["sleep", "30"], preexec_fn=groups[2].join)
    try:
        # (Other servers' cgroups on this machine are left alone: "in use" for this test.)
        assert host_cgroups.sweep(lambda n: n not in names) == 0  # all younger than a minute
        host_cgroups.sweep(lambda n: n not in names or n == names[1], min_age=0)
        assert not any(d.exists() for d in groups[0].dirs.values())  # empty and old: gone
        assert all(d.exists() for d in groups[1].dirs.values())  # in use
        assert all(d.exists() for d in groups[2].dirs.values())  # has a process
        groups[0].ensure(32 << 20, 8)  # a restarting kernel's cgroup is made again
        assert (groups[0].dirs["pids"] / "pids.max").read_text().strip() == "8"
    finally:
        sleeper.kill()
        sleeper.wait()
        for g in groups:
            for _ in range(40):
                if g.remove():
                    break
                time.sleep(0.05)
