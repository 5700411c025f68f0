"""Launching, restarting, stopping and taking over kernels: the one launch function every kernel
goes through, and :func:`adopt` for the kernels a previous server process left running.

Kernels are jupyter_client ``AsyncKernelManager``s over IPC sockets in a private directory per
kernel (jupyter_client's default ipc path is relative and shared, so concurrent kernels would
bind the same sockets and mix their messages: feasibility.md §2). Each starts through the
provisioner its kernelspec names (``kb-sandbox``, :mod:`bridge.provisioner`, for ours and for a
kernelspec that names none); another one (gateway_provisioners', an operator's own) is used
unchanged, with jupyter_client's own defaults.

Kernels outlive the server (issue 15): their keeper, not the server, is their parent.
:meth:`Kernel.record` is what a later server needs to take one over with :func:`adopt`;
:meth:`Kernel.detach` lets go of one without stopping it; :func:`sweep_ipc` removes what no
kept kernel uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from .cgroups import KernelCgroup
from .disk import mount_ipc
from .errors import KernelGone, KernelStartFailed
from .ipc import HELD, IPC_ROOT, claim, ipc_root, ipc_root_problem, remove_ipc, sweep_ipc
from .provisioner import NAME, SandboxProvisioner, Usage
from .readiness import wait_ready
from .sandbox import Confinement, Mount, Sandbox, SandboxUnavailable
from .wire import harden
from .zygote import Zygotes

log = logging.getLogger(__name__)

SPECS_DIR = Path(__file__).resolve().parent.parent / "kernelspecs" / "specs"
PROVISIONERS = "jupyter_client.kernel_provisioners"  # the entry point group
RECORD_VERSION = 1
__all__ = ["IPC_ROOT", "Kernel", "KernelGone", "Usage", "adopt", "ipc_root", "ipc_root_problem",
           "launch", "sweep_ipc"]


_context: zmq.asyncio.Context | None = None


def kernel_context() -> zmq.asyncio.Context:
    """The one zmq context of every kernel's manager and client, bounded (bridge/wire.py).
    jupyter_client makes a context per manager and per client by default: two I/O threads and
    two reapers started with every kernel (and kept while it lives), and a context teardown
    that waits out its sockets' linger at every shutdown. Clients do not start the heartbeat
    channel either (a thread each, pinging every second): a manager's client asks its manager
    whether the kernel lives."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
        harden(_context)
    return _context


def spec_manager() -> KernelSpecManager:
    """Our shipped specs first, then whatever Jupyter finds (ipykernel's python3, confined by
    us all the same: :func:`confine_by_default`)."""
    confine_by_default()
    ksm = KernelSpecManager()
    ksm.kernel_dirs = [str(SPECS_DIR), *ksm.kernel_dirs]
    return ksm


def confine_by_default() -> None:
    """A kernelspec without a ``kernel_provisioner`` stanza (ipykernel's python3, found by
    Jupyter) is started by our sandbox provisioner, never by jupyter_client's unconfined
    local-provisioner."""
    KernelProvisionerFactory.instance().default_provisioner_name = NAME


def provisioner_of(kspec: KernelSpec) -> tuple[str, bool]:
    """The provisioner a kernelspec is started through → (its name, whether it is ours: the
    sandbox provisioner or a subclass registered under another name)."""
    stanza = kspec.metadata.get("kernel_provisioner") or {}
    name = str(stanza.get("provisioner_name") or
               KernelProvisionerFactory.instance().default_provisioner_name)
    if name == NAME:
        return name, True
    try:
        eps = entry_points(group=PROVISIONERS, name=name)
        return name, any(issubclass(ep.load(), SandboxProvisioner) for ep in eps)
    except Exception:  # a broken entry point: the factory reports it when it starts the kernel
        return name, False


class Kernel:
    """One running kernel: its manager (process control, through its provisioner) and one
    client (channels)."""

    def __init__(self, manager: AsyncKernelManager, client: AsyncKernelClient, ipc_dir: Path,
                 spec: str, confinement: Confinement, launch_kw: dict[str, Any]) -> None:
        self.manager = manager
        self.client = client
        self.ipc_dir = ipc_dir
        self.spec = spec
        self.confinement = confinement
        self.started = time.monotonic()
        self._launch_kw = launch_kw  # the run-time objects our provisioner gets again on restart
        self._info: dict[str, Any] = {}
        # Called with the kernel when its record changed (a restart: a new process, maybe a
        # new keeper): whoever persists records persists it again.
        self.on_record_change: list[Callable[[Kernel], None]] = []

    @property
    def id(self) -> str:
        return str(self.manager.kernel_id)

    async def _remember(self) -> None:
        """Refresh what :meth:`record` returns (after a start, restart or adoption), and what a
        sweep needs to stop the kernel should nobody adopt it (``held``: no key in it)."""
        prov = self.manager.provisioner
        self._info = {} if prov is None else dict(await prov.get_provisioner_info())
        keeper, pid = self._info.get("keeper"), self._info.get("pid")
        if keeper and pid:
            nest = self._info.get("nest")  # {pid, keeper}: the plain keeper holds it
            held = [{"keeper": keeper, "pid": pid}, *([nest] if nest else [])]
            (self.ipc_dir / HELD).write_text(json.dumps(held))

    def record(self) -> dict[str, Any]:
        """JSON-serialisable: everything another server process needs to reach and control
        this kernel (:func:`adopt`). Holds the kernel's key: store it like a secret."""
        conn = {k: v.decode() if isinstance(v, bytes) else v
                for k, v in self.manager.get_connection_info().items()}
        kspec = self.manager.kernel_spec
        c = self.confinement
        return {
            "version": RECORD_VERSION,
            "spec": self.spec,
            "kernel_id": self.id,
            "ipc_dir": str(self.ipc_dir),
            "argv": list(kspec.argv) if kspec is not None else [],
            "connection": conn,
            "confinement": {
                "workdir": str(c.workdir), "ipc_dir": str(c.ipc_dir),
                "mounts": [{"host": str(m.host), "target": m.target, "read_only": m.read_only}
                           for m in c.mounts],
                "mem_bytes": c.mem_bytes, "pids": c.pids, "network": c.network,
                "environ": dict(c.environ)},
            "provisioner": {"name": type(self.manager.provisioner).__name__
                            if self.manager.provisioner is not None else "",
                            "entry_point": provisioner_of(kspec)[0] if kspec else "",
                            "info": self._info},
        }

    async def is_alive(self) -> bool:
        return bool(await self.manager.is_alive())

    async def interrupt(self) -> None:
        await self.manager.interrupt_kernel()

    async def restart(self, timeout: float) -> None:
        self.client.stop_channels()
        # The run-time objects again: an adopted kernel's manager never saw its start.
        await self.manager.restart_kernel(now=True, **self._launch_kw)
        self.client = self.manager.client(context=kernel_context())
        self.client.start_channels(hb=False)
        try:
            await wait_ready(self.client, timeout)
        except RuntimeError as exc:
            raise KernelStartFailed(f"Kernel {self.spec} did not come back: {exc}") from exc
        await self._remember()
        for changed in self.on_record_change:
            changed(self)

    async def shutdown(self, now: bool = False) -> None:
        """Escalating stop (shutdown_request → SIGTERM → SIGKILL), then the sockets' dir;
        ``now``: straight to the kill (a kernel with nothing worth a clean exit)."""
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        if now:
            # jupyter_client's forced shutdown still sends an interrupt_request on the control
            # socket; a manager with a zmq context of its own terminates it, which waits out
            # the socket's linger (100 ms) for a kernel already killed (a one-shot's, by its
            # cgroup) to take it, on the event loop, for every one-shot. Nothing on that socket
            # is worth delivering to a kernel about to be SIGKILLed.
            control = getattr(self.manager, "_control_socket", None)
            if control is not None:
                with contextlib.suppress(Exception):
                    control.linger = 0
        try:
            await asyncio.wait_for(self.manager.shutdown_kernel(now=now), timeout=5)
        except Exception:
            with contextlib.suppress(Exception):
                await self.manager.shutdown_kernel(now=True)
        release = getattr(self.manager.provisioner, "release_cgroup", None)
        if release is not None:  # normally done by the provisioner's cleanup already
            await release()
        remove_ipc(self.ipc_dir)

    def detach(self) -> None:
        """Let go of the kernel and leave it running with its keeper, for the next server
        (``serve --keep-kernels``): channels and descriptors close, nothing is signalled."""
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        detach = getattr(self.manager.provisioner, "detach", None)
        if detach is not None:
            detach()

    @property
    def cgroup(self) -> KernelCgroup | None:
        """The kernel's cgroup (kept across restarts), if the sandbox made one."""
        return getattr(self.manager.provisioner, "cgroup", None)

    def usage(self) -> Usage:
        """CPU, memory and I/O as the kernel's provisioner measures them (ours: its cgroup and
        process tree); zeros from a provisioner that does not say."""
        measure = getattr(self.manager.provisioner, "usage", None)
        if not callable(measure):
            return Usage(cpu_ms=0, mem_bytes=0, mem_max_bytes=0)
        found = measure()
        return found if isinstance(found, Usage) else Usage(cpu_ms=0, mem_bytes=0,
                                                            mem_max_bytes=0)


async def launch(spec: str, confinement: Confinement, sandbox: Sandbox,
                 ksm: KernelSpecManager, timeout: float, python: str | None = None,
                 zygotes: Mapping[str, Zygotes] | None = None) -> Kernel:
    """Start a kernel of ``spec`` confined by ``confinement`` and wait until it answers.

    The kernel starts through the provisioner its kernelspec names (``kb-sandbox`` when it
    names none). Ours gets the run-time objects through ``km.start_kernel(**kw)``:
    ``python``, the interpreter of the operator's Python environment (KB_PYTHON_ENV) for
    kernels whose language is Python (our own kernels — bash, compiled, JavaScript, Ruby — are
    modules of this package and always run on the server's interpreter); ``zygotes``, the
    server's keepers (:func:`bridge.zygote.for_interpreters`): a kernel a zygote can fork is
    forked, anything else spawned by the plain keeper; either way it outlives the server.
    Raises KernelStartFailed.
    """
    try:
        root = ipc_root()
    except SandboxUnavailable as exc:
        raise KernelStartFailed(str(exc)) from exc
    confine_by_default()
    ipc_dir = Path(tempfile.mkdtemp(prefix="k", dir=root))
    try:
        name, ours = provisioner_of(ksm.get_kernel_spec(spec))
    except NoSuchKernel as exc:
        remove_ipc(ipc_dir)
        raise KernelStartFailed(f"No kernelspec {spec!r} installed.") from exc
    mount_ipc(ipc_dir)  # size-capped: the kernel writes here, on the host's disk otherwise
    claim(ipc_dir)
    confinement = replace(confinement, ipc_dir=ipc_dir)
    if ours:
        # The connection file stays root's in the root-owned ipc_dir (the kernel may read it,
        # not rewrite it nor replace it with a link for the server to write through on a
        # restart); the sockets go in ``s/``, the one directory the sandbox uid may write
        # (Sandbox.hand_over).
        km = AsyncKernelManager(
            kernel_name=spec, kernel_spec_manager=ksm, transport="ipc",
            ip=str(ipc_dir / "s" / "k"), connection_file=str(ipc_dir / "conn.json"),
            context=kernel_context())
    else:
        log.info("kernel %s starts through the %r provisioner its kernelspec names: its "
                 "confinement is that provisioner's, not kernel-bridge's sandbox", spec, name)
        km = AsyncKernelManager(kernel_name=spec, kernel_spec_manager=ksm,
                                connection_file=str(ipc_dir / "conn.json"),
                                context=kernel_context())
    kspec = km.kernel_spec
    assert kspec is not None
    kw: dict[str, Any] = {}
    if ours:
        # A SIGINT to the process group would kill bwrap itself (feasibility.md §5).
        kspec.interrupt_mode = "message"
        if kspec.argv and kspec.argv[0] in ("python", "python3"):
            kspec.argv[0] = python if python and kspec.language == "python" else sys.executable
            if python and kspec.language == "python" and "PATH" not in confinement.environ:
                # `!python`, `!pip list` and subprocesses of a notebook find the same
                # environment.
                path = (f"{Path(python).parent}{os.pathsep}"
                        f"{sandbox.kernel_environ(confinement)['PATH']}")
                confinement = replace(confinement,
                                      environ={**confinement.environ, "PATH": path})
        kw = {"sandbox": sandbox, "confinement": confinement, "zygotes": zygotes}
    km.kernel_id = os.path.basename(ipc_dir)
    client: AsyncKernelClient | None = None
    try:
        await km.start_kernel(**kw)
        client = km.client(context=kernel_context())
        client.start_channels(hb=False)
        await wait_ready(client, timeout)
    except Exception as exc:
        if client is not None:
            client.stop_channels()
        with contextlib.suppress(Exception):
            await km.shutdown_kernel(now=True)
        remove_ipc(ipc_dir)
        raise KernelStartFailed(f"Kernel {spec!r} failed to start: {exc}") from exc
    kernel = Kernel(km, client, ipc_dir, spec, confinement, kw)
    await kernel._remember()
    return kernel


async def adopt(record: Mapping[str, Any], *, sandbox: Sandbox, ksm: KernelSpecManager,
                timeout: float, zygotes: Mapping[str, Zygotes] | None = None) -> Kernel:
    """Reconnect to a kernel a previous server process started (:meth:`Kernel.record`): its
    provisioner is rebuilt from the record (jupyter_client's persistence hooks), reaches the
    kernel's keeper for a pidfd and re-opens its cgroup by path; its channels must answer a
    ``kernel_info`` within ``timeout``. ``sandbox`` and ``zygotes`` serve its restarts.

    Raises KernelGone (with the reason) when it died or does not answer; then nothing of it is
    left (process, cgroup, sockets' dir).
    """
    confine_by_default()
    spec = str(record["spec"])
    ipc_dir = Path(record["ipc_dir"])
    conn = dict(record["connection"])
    c = record["confinement"]
    confinement = Confinement(
        workdir=Path(c["workdir"]), ipc_dir=Path(c["ipc_dir"]),
        mounts=tuple(Mount(Path(m["host"]), m["target"], bool(m["read_only"]))
                     for m in c.get("mounts", [])),
        mem_bytes=int(c.get("mem_bytes", 0)), pids=int(c.get("pids", 0)),
        network=bool(c.get("network")), environ=dict(c.get("environ", {})))
    km = AsyncKernelManager(kernel_name=spec, kernel_spec_manager=ksm,
                            transport=conn.get("transport", "tcp"),
                            connection_file=str(ipc_dir / "conn.json"),
                            context=kernel_context())
    km.load_connection_info(conn)  # type: ignore[arg-type]  # paths or ports, key, scheme
    km.kernel_id = str(record["kernel_id"])
    try:
        found = km.kernel_spec
    except NoSuchKernel:
        found = None
    if found is None:
        remove_ipc(ipc_dir)
        raise KernelGone(f"Kernel {spec!r} cannot be taken over: its kernelspec is no longer "
                         "installed.")
    kspec = found
    _name, ours = provisioner_of(kspec)
    kw: dict[str, Any] = {}
    if ours:
        kspec.interrupt_mode = "message"
        if record.get("argv"):
            kspec.argv = list(record["argv"])  # the interpreter it was started with
        kw = {"sandbox": sandbox, "confinement": confinement, "zygotes": zygotes}
    # jupyter_client has no call that attaches a provisioner to a running kernel; its
    # persistence hooks are used as they are meant to be (Enterprise Gateway's HA does the
    # same): the factory makes the provisioner the kernelspec names, load_provisioner_info
    # restores it.
    km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, kspec, parent=km)
    # The manager's "a start was attempted" mark, as after its own start: without it, the
    # start inside a restart reuses the ready-future the shutdown before it already resolved.
    km._attempted_start = True
    await km.provisioner.load_provisioner_info(dict(record["provisioner"]["info"]))
    if not await km.is_alive():
        reason = getattr(km.provisioner, "gone_reason", "") or "it is no longer running"
        await _drop(km, ipc_dir)
        raise KernelGone(f"Kernel {spec!r} is gone: {reason}.")
    client = km.client(context=kernel_context())
    client.start_channels(hb=False)
    try:
        # On control: a kernel the old server left mid-cell answers there at once (on shell
        # only once the cell ends, and a long cell must not look like a dead kernel).
        await wait_ready(client, timeout, control=True)
    except RuntimeError as exc:
        client.stop_channels()
        await _drop(km, ipc_dir)
        raise KernelGone(f"Kernel {spec!r} does not answer: {exc}.") from exc
    claim(ipc_dir)
    kernel = Kernel(km, client, ipc_dir, spec, confinement, kw)
    await kernel._remember()
    return kernel


async def _drop(km: AsyncKernelManager, ipc_dir: Path) -> None:
    """Leave nothing of a kernel that cannot be taken over."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(km.shutdown_kernel(now=True), timeout=5)
    release = getattr(km.provisioner, "release_cgroup", None)
    if release is not None:
        with contextlib.suppress(Exception):
            await release()
    remove_ipc(ipc_dir)


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
            # Our provisioner starts kernels for kernel-bridge only; a Jupyter elsewhere starts
            # them as its own (its local provisioner), as it would any kernel.
            spec.get("metadata", {}).pop("kernel_provisioner", None)
            (staged / "kernel.json").write_text(json.dumps(spec, indent=2))
            path = ksm.install_kernel_spec(str(staged), spec_dir.name, user=user, prefix=prefix)
        done.append((spec_dir.name, path))
    return done
