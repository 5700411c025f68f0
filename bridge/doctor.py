"""``kernel-bridge doctor``: can this machine run the server safely? One verdict per check.

Each check answers ``ok``, ``warn`` (the server runs, with something less: a language missing, no
process cap) or ``fail`` (running would be unsafe or would not work), and on anything but ``ok``
says how to fix it. ``serve`` runs the same checks at start (without the toolchain versions, which
cost seconds) and refuses to start on a ``fail`` unless started with ``--unsafe``; with
``--no-sandbox`` (``KB_SANDBOX=off``) the sandbox checks are skipped, as the operator chose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .cgroups import Cgroups
from .ipc import IPC_ROOT, ipc_root_problem
from .languages import LANGUAGES, Language
from .settings import Settings

Verdict = Literal["ok", "warn", "fail", "skip"]
PROBE_TIMEOUT_S = 10.0
MIN_FREE_BYTES = 512 * 1024 * 1024  # below this a session's files can fill the disk soon
WARN_FREE_BYTES = 2 * 1024 * 1024 * 1024
# Debian packages that bring each language's tools (the fix line names them).
PACKAGES = {"gcc": "gcc", "g++": "g++", "go": "golang-go", "rustc": "rustc",
            "javac": "default-jdk-headless", "java": "default-jdk-headless", "ruby": "ruby",
            "node": "nodejs", "bash": "bash", "python3": "python3"}


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.verdict.upper():4}  {self.name}: {self.detail}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


def _probe(argv: list[str]) -> tuple[bool, str]:
    """Run a short command; (succeeded, its last line of output)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    if p.returncode == 0:  # a version banner's first line
        lines = (p.stdout.strip() or p.stderr.strip()).splitlines()
        return True, lines[0] if lines else ""
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()  # the error, last
    return False, lines[-1] if lines else f"exit code {p.returncode}"


# -- the sandbox ----------------------------------------------------------------------------------

# What a probe of bwrap shows its ``true``: the system's programs and libraries, never the whole
# root. ``--ro-bind / /`` copies every mount on the host, kernels' socket tmpfs and sessions'
# disks included, and fails ("Can't bind mount /oldroot/…: No such file or directory") when one of
# them goes away meanwhile: any other server's kernel ending made /readyz and a starting server's
# check fail at random on a busy host.
PROBE_BINDS = ("--ro-bind", "/usr", "/usr", "--ro-bind-try", "/bin", "/bin", "--ro-bind-try",
               "/lib", "/lib", "--ro-bind-try", "/lib64", "/lib64")


def probe_argv(bwrap: str, *options: str) -> list[str]:
    """bwrap running ``true`` confined (``options`` first: ``--unshare-user``…)."""
    return [bwrap, *options, *PROBE_BINDS, "true"]


def bubblewrap() -> Check:
    path = shutil.which("bwrap")
    if path is None:
        return Check("bubblewrap", "fail", "bwrap not found on PATH",
                     "apt-get install bubblewrap (or start with --no-sandbox: unsafe)")
    ok, out = _probe(probe_argv(path))
    if not ok:
        return Check("bubblewrap", "fail", f"{path} does not run: {out}",
                     "allow namespaces for bwrap (kernel.unprivileged_userns_clone=1, or run "
                     "as root, or an AppArmor profile for bwrap), or reinstall bubblewrap")
    return Check("bubblewrap", "ok", f"{path} runs a confined command")


def user_namespaces() -> Check:
    path = shutil.which("bwrap")
    if path is None:
        return Check("user namespaces", "fail", "cannot test without bwrap",
                     "apt-get install bubblewrap")
    ok, out = _probe(probe_argv(path, "--unshare-user"))
    if ok:
        return Check("user namespaces", "ok", "bwrap can create a user namespace")
    if os.geteuid() == 0:  # root makes the other namespaces without one
        return Check("user namespaces", "warn", f"unavailable ({out}); not needed as root",
                     "sysctl -w user.max_user_namespaces=10000 to run as a non-root user")
    return Check("user namespaces", "fail", f"unavailable: {out}",
                 "sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=10000")


def seccomp() -> Check:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return Check("seccomp", "fail", "libseccomp not found", "apt-get install libseccomp2")
    try:
        lib = ctypes.CDLL(name)
        version = lib.seccomp_version
        version.restype = ctypes.c_void_p
        v = ctypes.cast(version(), ctypes.POINTER(ctypes.c_uint * 3)).contents
        found = f"{name} {v[0]}.{v[1]}.{v[2]}"
    except (OSError, AttributeError) as exc:
        return Check("seccomp", "fail", f"{name} does not load: {exc}",
                     "apt-get install --reinstall libseccomp2")
    status = Path("/proc/self/status").read_text()
    if "Seccomp:" not in status:
        return Check("seccomp", "fail", f"{found} loads, but this kernel has no seccomp",
                     "run on a kernel built with CONFIG_SECCOMP_FILTER")
    return Check("seccomp", "ok", f"{found}; the kernel filters system calls")


def cgroups() -> Check:
    found = Cgroups.detect()
    if found.enabled:
        return Check("cgroups", "ok", found.describe())
    return Check("cgroups", "warn", "no writable cgroup v2 (memory+pids) or v1 hierarchy: memory "
                 "is capped by RLIMIT_AS only and there is no process cap",
                 "run as root on a host with cgroup v2, or give the server a delegated cgroup "
                 "(systemd: Delegate=yes)")


def disk_quota(settings: Settings) -> Check:
    # What bridge.disk.Volumes needs; serve refuses to confine tenants without it, so a missing
    # piece fails here too unless the operator turned quotas off (KB_SESSION_DISK_MB=0).
    if not settings.session_disk_mb:
        return Check("disk quota", "warn", "KB_SESSION_DISK_MB=0: a session can fill the data "
                     "dir's disk", "set KB_SESSION_DISK_MB (default 1024)")
    verdict: Verdict = "fail" if settings.sandbox != "off" else "warn"
    if os.geteuid() != 0:
        return Check("disk quota", verdict, "not root: loop mounts need CAP_SYS_ADMIN",
                     "run the server as root, or KB_SESSION_DISK_MB=0 (no disk quota)")
    if not os.path.exists("/dev/loop-control"):
        return Check("disk quota", verdict, "no /dev/loop-control: per-session filesystems "
                     "(KB_SESSION_DISK_MB) cannot be made", "modprobe loop; in a container, "
                     "pass --device /dev/loop-control and /dev/loop*")
    losetup, mkfs = shutil.which("losetup"), shutil.which("mkfs.ext4")
    if losetup is None or mkfs is None:
        return Check("disk quota", verdict, "losetup or mkfs.ext4 missing",
                     "apt-get install mount e2fsprogs")
    ok, out = _probe([losetup, "-f"])
    if not ok:
        return Check("disk quota", verdict, f"no free loop device: {out}",
                     "free loop devices (losetup -D) or raise max_loop")
    return Check("disk quota", "ok", f"loop devices available (next free: {out})")


def provisioner() -> Check:
    """The kb-sandbox entry point every shipped kernelspec names: without it (an install older
    than pyproject.toml's), no kernel starts."""
    from importlib.metadata import entry_points

    from .kernels import PROVISIONERS
    from .provisioner import NAME, SandboxProvisioner

    found = entry_points(group=PROVISIONERS, name=NAME)
    try:
        ours = any(ep.load() is SandboxProvisioner for ep in found)
    except Exception:
        ours = False
    if not ours:
        return Check("provisioner", "fail", f"the {NAME!r} kernel provisioner is not registered "
                     "(an outdated install): no kernel can start",
                     f"{sys.executable} -m pip install -e . (or make venv)")
    return Check("provisioner", "ok", f"{NAME} registered ({PROVISIONERS})")


# -- the server's own files ------------------------------------------------------------------------

def ipc_root(root: Path = IPC_ROOT) -> Check:
    try:
        problem = ipc_root_problem(root)  # the rule the launch function enforces
    except FileNotFoundError:
        return Check("IPC root", "ok", f"{root} will be created (mode 0700)")
    if problem:
        return Check("IPC root", "fail", f"{root} {problem}: another user could read or "
                     "replace kernel sockets",
                     f"rm -rf {root} (as root), or set TMPDIR to a private directory")
    return Check("IPC root", "ok", f"{root} is ours, mode 0700")


def data_dir(path: Path) -> Check:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path:
        if not os.access(existing, os.W_OK | os.X_OK):
            return Check("data dir", "fail", f"{path} does not exist and {existing} is not "
                         "writable", f"mkdir -m 700 {path} && chown $(id -u) {path}")
        return Check("data dir", "ok", f"{path} will be created (mode 0700)")
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        return Check("data dir", "fail", f"{path} is not a directory", f"rm {path}")
    if st.st_uid != os.geteuid():
        return Check("data dir", "fail", f"{path} is owned by uid {st.st_uid}, not "
                     f"{os.geteuid()}", f"chown -R {os.geteuid()} {path}")
    if st.st_mode & 0o077:
        return Check("data dir", "fail", f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                     "other users may read keypair secrets and session files",
                     f"chmod 700 {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check("data dir", "fail", f"{path} is not writable", f"chmod u+rwx {path}")
    return Check("data dir", "ok", f"{path}, mode 0700")


def free_space(path: Path) -> Check:
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    text = f"{free / 2**30:.1f} GiB free under {existing}"
    if free < MIN_FREE_BYTES:
        return Check("free space", "fail", text, "free disk space or move --data-dir")
    if free < WARN_FREE_BYTES:
        return Check("free space", "warn", text, "free disk space or move --data-dir")
    return Check("free space", "ok", text)


def database(db_path: Path) -> Check:
    if not db_path.exists():
        return Check("database", "ok", f"{db_path} will be created")
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            (answer,) = con.execute("PRAGMA quick_check").fetchone()
            (keys,) = con.execute("SELECT count(*) FROM keypairs").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return Check("database", "fail", f"{db_path}: {exc}",
                     f"restore {db_path} from a backup, or move it aside to start afresh")
    if answer != "ok":
        return Check("database", "fail", f"{db_path}: {answer}",
                     f"restore {db_path} from a backup")
    return Check("database", "ok", f"{db_path}, {keys} keypair(s), integrity ok")


def postgres_database(url: str) -> Check:
    """KB_DATABASE_URL: reachable, and at a schema version this release can run."""
    import psycopg

    from .store import migrations
    from .store.postgres import redact

    where = redact(url)
    try:
        with psycopg.connect(url, connect_timeout=5) as con:
            version_row = con.execute("SELECT to_regclass('schema_version') IS NOT NULL"
                                      ).fetchone()
            if not version_row or not version_row[0]:
                return Check("database", "ok", f"{where}: empty, the server will create its "
                             "tables")
            (version,) = con.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version"
                                     ).fetchone() or (0,)
            (keys,) = con.execute("SELECT count(*) FROM keypairs").fetchone() or (0,)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Check("database", "fail", f"{where}: {first}",
                     "start PostgreSQL, or fix KB_DATABASE_URL")
    if version > migrations.LATEST:
        return Check("database", "fail", f"{where}: schema version {version} is newer than "
                     f"this release's ({migrations.LATEST})", "run the newer release")
    return Check("database", "ok", f"{where}, schema version {version}, {keys} keypair(s)")


# -- languages ------------------------------------------------------------------------------------

def toolchain(lang: Language, versions: bool = True) -> Check:
    missing = [t for t in lang.toolchain if shutil.which(t) is None]
    name = f"language {lang.name}"
    if missing:
        pkgs = " ".join(dict.fromkeys(PACKAGES.get(t, t) for t in missing))
        # Not unsafe: the server runs and offers the other languages.
        return Check(name, "warn", f"missing {', '.join(missing)} (not offered)",
                     f"apt-get install {pkgs}")
    if not versions:
        return Check(name, "ok", "available")
    tool = lang.toolchain[0]
    if lang.name == "python":  # kernels run on the server's own interpreter
        tool = sys.executable
    argv = list(lang.version_cmd) or [tool, "--version"]
    if tool in ("go",) and not lang.version_cmd:
        argv = [tool, "version"]
    elif tool in ("javac",) and not lang.version_cmd:
        argv = [tool, "-version"]
    ok, out = _probe(argv)
    first = out if ok else f"({out})"
    return Check(name, "ok", f"{shutil.which(tool)}: {first}")


# -- all of it ------------------------------------------------------------------------------------

def checks(settings: Settings, *, versions: bool = True) -> list[Callable[[], Check]]:
    sandbox: list[Callable[[], Check]] = [bubblewrap, user_namespaces, seccomp, cgroups]
    if settings.sandbox == "off":
        sandbox = [lambda: Check("sandbox", "skip", "KB_SANDBOX=off / --no-sandbox: kernels "
                                 "run unconfined (unsafe)")]
    url = settings.database_url
    store: Callable[[], Check] = ((lambda: postgres_database(url)) if url
                                  else (lambda: database(settings.db_path)))
    return [*sandbox, provisioner, lambda: disk_quota(settings), ipc_root,
            lambda: data_dir(settings.data_dir), lambda: free_space(settings.data_dir), store,
            *(lambda lang=lang: toolchain(lang, versions) for lang in LANGUAGES)]


@dataclass(frozen=True)
class Report:
    checks: list[Check]
    seconds: float

    @property
    def safe(self) -> bool:
        return all(c.verdict != "fail" for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == "fail"]


def run(settings: Settings, *, versions: bool = True) -> Report:
    started = time.monotonic()
    done = [check() for check in checks(settings, versions=versions)]
    return Report(done, time.monotonic() - started)
