"""Launching, restarting and stopping kernels: the one launch function every kernel goes through.

Kernels are jupyter_client ``AsyncKernelManager``s over IPC sockets in a private directory per
kernel (jupyter_client's default ipc path is relative and shared, so concurrent kernels would
bind the same sockets and mix their messages: feasibility.md §2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from .cgroups import KernelCgroup
from .disk import mount_ipc, unmount_ipc
from .errors import KernelStartFailed
from .provisioner import SandboxProvisioner
from .readiness import wait_ready
from .sandbox import Confinement, Sandbox, SandboxUnavailable
from .wire import harden
from .zygote import Zygotes
from .zygote_provisioner import ZygoteProvisioner

log = logging.getLogger(__name__)

SPECS_DIR = Path(__file__).resolve().parent.parent / "kernelspecs" / "specs"
# sun_path is 108 bytes; a short private root keeps every socket path well under it.
IPC_ROOT = Path(tempfile.gettempdir()) / f"kb-ipc-{os.getuid()}"


def ipc_root(root: Path = IPC_ROOT) -> Path:
    """The private parent of every kernel's sockets and connection file (which holds the key
    that signs its messages), created 0700. Refused, never repaired, when it is a link, someone
    else's, or open to group or others: whoever made it first would hold every kernel.

    Raises SandboxUnavailable.
    """
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    problem = ipc_root_problem(root)
    if problem:
        raise SandboxUnavailable(
            f"The kernels' IPC root {root} {problem}. Someone else may be able to read kernel "
            f"keys there: remove it (`rm -rf {root}`) and start again.")
    return root


def ipc_root_problem(root: Path = IPC_ROOT) -> str:
    """What is wrong with an existing IPC root ("" when it is ours and private)."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o077:
        return f"has mode {stat.filemode(st.st_mode)}, not drwx------"
    return ""


def spec_manager() -> KernelSpecManager:
    """Our shipped specs first, then whatever Jupyter finds (ipykernel's python3)."""
    ksm = KernelSpecManager()
    ksm.kernel_dirs = [str(SPECS_DIR), *ksm.kernel_dirs]
    return ksm


@dataclass(frozen=True)
class Usage:
    cpu_ms: int
    mem_bytes: int
    mem_max_bytes: int
    io_read_bytes: int = 0
    io_write_bytes: int = 0


class Kernel:
    """One running kernel: its manager (process control) and one client (channels)."""

    def __init__(self, manager: AsyncKernelManager, client: AsyncKernelClient, ipc_dir: Path,
                 spec: str, confinement: Confinement) -> None:
        self.manager = manager
        self.client = client
        self.ipc_dir = ipc_dir
        self.spec = spec
        self.confinement = confinement
        self.started = time.monotonic()
        self._cpu_before_restart = 0.0
        self._mem_max = 0

    @property
    def id(self) -> str:
        return str(self.manager.kernel_id)

    async def is_alive(self) -> bool:
        return bool(await self.manager.is_alive())

    async def interrupt(self) -> None:
        await self.manager.interrupt_kernel()

    async def restart(self, timeout: float) -> None:
        self._cpu_before_restart += self._cpu_seconds()
        self.client.stop_channels()
        await self.manager.restart_kernel(now=True)
        self.client = self.manager.client()
        harden(self.client.context)
        self.client.start_channels()
        try:
            await wait_ready(self.client, timeout)
        except RuntimeError as exc:
            raise KernelStartFailed(f"Kernel {self.spec} did not come back: {exc}") from exc

    async def shutdown(self, now: bool = False) -> None:
        """Escalating stop (shutdown_request → SIGTERM → SIGKILL), then the sockets' dir;
        ``now``: straight to the kill (a kernel with nothing worth a clean exit)."""
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        try:
            await asyncio.wait_for(self.manager.shutdown_kernel(now=now), timeout=5)
        except Exception:
            with contextlib.suppress(Exception):
                await self.manager.shutdown_kernel(now=True)
        release = getattr(self.manager.provisioner, "release_cgroup", None)
        if release is not None:  # normally done by the provisioner's cleanup already
            await release()
        unmount_ipc(self.ipc_dir)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    @property
    def cgroup(self) -> KernelCgroup | None:
        """The kernel's cgroup (kept across restarts), if the sandbox made one."""
        return getattr(self.manager.provisioner, "cgroup", None)

    def _processes(self) -> list[psutil.Process]:
        # Only a local provisioner has a process we can measure; remote ones report zero.
        pid = getattr(self.manager.provisioner, "pid", None)
        if not pid:
            return []
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _cpu_seconds(self) -> float:
        total = 0.0
        for p in self._processes():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def usage(self) -> Usage:
        """CPU and memory from the kernel's cgroup when it has one (everything that ever ran
        in it, reaped children and restarts included), else from its live process tree."""
        mem = io_r = io_w = 0
        procs = self._processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                io = p.io_counters()
                io_r += io.read_bytes
                io_w += io.write_bytes
        cg = self.cgroup
        measured = cg.memory() if cg is not None else None
        cpu = cg.cpu_seconds() if cg is not None else None
        if measured is not None:
            mem, peak = measured
            self._mem_max = max(self._mem_max, peak)
        else:
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    mem += p.memory_info().rss
            self._mem_max = max(self._mem_max, mem)
        if cpu is None:
            cpu = self._cpu_before_restart + self._cpu_seconds()
        return Usage(cpu_ms=int(cpu * 1000), mem_bytes=mem, mem_max_bytes=self._mem_max,
                     io_read_bytes=io_r, io_write_bytes=io_w)


async def launch(spec: str, confinement: Confinement, sandbox: Sandbox,
                 ksm: KernelSpecManager, timeout: float, python: str | None = None,
                 zygotes: Mapping[str, Zygotes] | None = None) -> Kernel:
    """Start a kernel of ``spec`` confined by ``confinement`` and wait until it answers.

    ``python``: the interpreter of the operator's Python environment (KB_PYTHON_ENV) for
    kernels whose language is Python; our own kernels (bash, compiled, JavaScript, Ruby) are
    modules of this package and always run on the server's interpreter.
    With ``zygotes`` (a zygote line per interpreter), a kernel a zygote can fork
    (bridge/zygote.py) is forked from a pre-imported one; anything else, or any failure of
    that, starts cold.
    Raises KernelStartFailed.
    """
    try:
        root = ipc_root()
    except SandboxUnavailable as exc:
        raise KernelStartFailed(str(exc)) from exc
    ipc_dir = Path(tempfile.mkdtemp(prefix="k", dir=root))
    mount_ipc(ipc_dir)  # size-capped: the kernel writes here, on the host's disk otherwise
    confinement = replace(confinement, ipc_dir=ipc_dir)
    # The connection file stays root's in the root-owned ipc_dir (the kernel may read it, not
    # rewrite it nor replace it with a link for the server to write through on a restart); the
    # sockets go in ``s/``, the one directory the sandbox uid may write (Sandbox.hand_over).
    km = AsyncKernelManager(
        kernel_name=spec, kernel_spec_manager=ksm, transport="ipc",
        ip=str(ipc_dir / "s" / "k"), connection_file=str(ipc_dir / "conn.json"),
    )
    try:
        kspec = km.kernel_spec
    except NoSuchKernel as exc:
        unmount_ipc(ipc_dir)
        shutil.rmtree(ipc_dir, ignore_errors=True)
        raise KernelStartFailed(f"No kernelspec {spec!r} installed.") from exc
    assert kspec is not None
    # A SIGINT to the process group would kill bwrap itself (feasibility.md §5).
    kspec.interrupt_mode = "message"
    if kspec.argv and kspec.argv[0] in ("python", "python3"):
        kspec.argv[0] = python if python and kspec.language == "python" else sys.executable
        if python and kspec.language == "python" and "PATH" not in confinement.environ:
            # `!python`, `!pip list` and subprocesses of a notebook find the same environment.
            path = f"{Path(python).parent}{os.pathsep}{sandbox.kernel_environ(confinement)['PATH']}"
            confinement = replace(confinement, environ={**confinement.environ, "PATH": path})
    km.kernel_id = os.path.basename(ipc_dir)
    harden(km.context)  # the manager's and its clients' sockets: bounded whatever the kernel sends
    provisioner = (ZygoteProvisioner if zygotes is not None else SandboxProvisioner)(
        kernel_id=km.kernel_id, kernel_spec=kspec, parent=km)
    if isinstance(provisioner, ZygoteProvisioner):
        provisioner.zygote_lines = zygotes
    provisioner.sandbox = sandbox
    provisioner.confinement = confinement
    km.provisioner = provisioner
    client: AsyncKernelClient | None = None
    try:
        await km.start_kernel()
        client = km.client()  # a context of its own, not the manager's
        harden(client.context)
        client.start_channels()
        await wait_ready(client, timeout)
    except Exception as exc:
        if client is not None:
            client.stop_channels()
        with contextlib.suppress(Exception):
            await km.shutdown_kernel(now=True)
        unmount_ipc(ipc_dir)
        shutil.rmtree(ipc_dir, ignore_errors=True)
        raise KernelStartFailed(f"Kernel {spec!r} failed to start: {exc}") from exc
    return Kernel(km, client, ipc_dir, spec, confinement)


def install_kernelspecs(*, user: bool = False, prefix: str | None = None) -> list[tuple[str, str]]:
    """Install every shipped spec with its interpreter made absolute; returns (name, path)."""
    ksm = KernelSpecManager()
    done = []
    for spec_dir in sorted(SPECS_DIR.iterdir()):
        if not (spec_dir / "kernel.json").is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / spec_dir.name
            shutil.copytree(spec_dir, staged)
            spec = json.loads((staged / "kernel.json").read_text())
            if spec["argv"][0] in ("python", "python3"):
                # A Jupyter elsewhere must start our kernels with this environment's Python.
                spec["argv"][0] = sys.executable
            (staged / "kernel.json").write_text(json.dumps(spec, indent=2))
            path = ksm.install_kernel_spec(str(staged), spec_dir.name, user=user, prefix=prefix)
        done.append((spec_dir.name, path))
    return done
