"""``kb-sandbox``: the jupyter_client kernel provisioner that starts every kernel of ours inside
the sandbox, forked from a zygote when it can, cold otherwise.

Registered as an entry point (group ``jupyter_client.kernel_provisioners``) and named in every
shipped kernelspec's ``metadata.kernel_provisioner``; ``AsyncKernelManager``'s own factory
creates it. Configured from the kernelspec (``config``: ``fork``), and at run time from the
keyword arguments of ``km.start_kernel(sandbox=…, confinement=…, zygotes=…)``, which
jupyter_client hands to :meth:`pre_launch` and keeps for restarts. A restarted kernel is confined
and capped like the first, in the same cgroup.

One provisioner, not two (a cold one and a zygote one): the choice between a fork and a cold
start is made per launch (an interpreter environment, a dead zygote, a restart), and everything
else — pre-launch, cgroup, process control, persistence, usage — is the same for both.

Every kernel has a *keeper* (``kernelspecs/_zygote.py``): the zygote that forked it or the plain
keeper that spawned its bubblewrap. The keeper, not the server, is its parent and reaper, and
does not die with the server (issue 15). Process control goes through a pidfd the keeper hands
out (never a bare pid: a reaped pid may be reused); :meth:`get_provisioner_info` and
:meth:`load_provisioner_info` carry everything a later server needs to take the kernel over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Bool

from . import forked
from .cgroups import KernelCgroup
from .keeper import Keeper, ZygoteUnavailable, reach
from .kernel_logs import StderrRelay
from .sandbox import Confinement, HostLaunch, Sandbox
from .zygote import KEEPER, Zygotes, forkable

log = logging.getLogger(__name__)

NAME = "kb-sandbox"  # the entry point's name, as kernelspecs write it
# A pidfd reads ready once the process has exited; the keeper's exit report follows shortly.
EXIT_REPORT_WAIT_S = 0.5
KILLED = -signal.SIGKILL


@dataclass(frozen=True)
class Usage:
    cpu_ms: int
    mem_bytes: int
    mem_max_bytes: int
    io_read_bytes: int = 0
    io_write_bytes: int = 0


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner whose kernels run in the sandbox, held by a keeper."""

    fork = Bool(True, config=True,
                help="Whether a zygote may fork this kernel (else it always starts cold).")

    sandbox: Sandbox | None = None
    confinement: Confinement | None = None
    lines: Mapping[str, Zygotes] | None = None  # the server's keepers and zygote lines
    cgroup: KernelCgroup | None = None
    stderr: StderrRelay | None = None
    keeper: Keeper | None = None  # holds the running kernel; None: the server's own child
    from_zygote = False  # whether the running kernel was forked by a zygote
    gone_reason = ""  # why an adopted kernel is not there
    nest: forked.Nest | None = None  # a forked kernel's sandbox holder
    _pidfd: int | None = None
    _exit: int | None = None
    _pending: HostLaunch | None = None
    _cpu_before = 0.0  # CPU of processes gone by restarts, when there is no cgroup
    _mem_max = 0

    # -- launch ---------------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # Run-time objects from km.start_kernel(**kw); jupyter_client passes them again on a
        # restart (KernelManager keeps the start's keyword arguments).
        self.sandbox = kwargs.pop("sandbox", None) or self.sandbox
        self.confinement = kwargs.pop("confinement", None) or self.confinement
        self.lines = kwargs.pop("zygotes", None) or self.lines
        if self.sandbox is None or self.confinement is None:
            raise RuntimeError(f"The {NAME} provisioner starts kernels for kernel-bridge only "
                               "(km.start_kernel(sandbox=…, confinement=…)).")
        sandbox, conf = self.sandbox, self.confinement
        kwargs["env"] = sandbox.kernel_environ(conf)
        # Writes the connection file and applies the kernelspec's env substitutions.
        kwargs = await super().pre_launch(**kwargs)
        connection_file = getattr(self.parent, "connection_file", "")
        sandbox.hand_over(conf, Path(connection_file) if connection_file else None)
        # Fails closed: a kernel whose caps cannot be set does not start.
        if self.cgroup is None:
            self.cgroup = sandbox.new_cgroup(str(self.kernel_id), conf)
        else:  # a restart: same cgroup, CPU time goes on
            self.cgroup.ensure(conf.mem_bytes, conf.pids or sandbox.default_pids)
        # ``cmd`` and ``env`` stay the kernel's: what runs on the host (bubblewrap, its
        # descriptors) is built only for a start that spawns it (_host_launch), not for a fork.
        kwargs["preexec_fn"] = sandbox.preexec(conf, self.cgroup)
        # A kernel's own stdout is banners ("To connect another client…"), not user output
        # (that travels on iopub); its stderr goes to the server's log for diagnosis, line by
        # line as records (bridge/kernel_logs.py), so a JSON log stays one object per line:
        # through this relay when the server starts the kernel itself, else its keeper's.
        kwargs["stdout"] = subprocess.DEVNULL
        if self.stderr is not None:  # a restart: the old process's pipe
            self.stderr.close()
        self.stderr = StderrRelay(str(self.kernel_id))
        kwargs["stderr"] = self.stderr.write_fd
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        km = self.parent
        raw = km.format_kernel_cmd() if km is not None else list(cmd)
        self.from_zygote, self._exit, self.keeper, self.gone_reason = False, None, None, ""
        lines = self.lines or {}
        assert self.sandbox is not None and self.confinement is not None
        try:
            zline = lines.get(raw[0]) if raw and self.fork else None
            if zline is not None and forkable(raw, self.confinement.environ, zline.python):
                try:
                    await self._held(*await forked.fork(self, zline, raw, lines.get(KEEPER)),
                                     zygote=True)
                    self.from_zygote = True
                    return self.connection_info
                except ZygoteUnavailable as exc:
                    log.info("kernel %s starts cold: %s", self.kernel_id, exc)
                    await self._abandon()
            cmd, kwargs = self._host_launch(cmd, kwargs)
            keeper = lines.get(KEEPER)
            if keeper is not None:
                try:
                    await self._held(*await forked.spawn(self, keeper, cmd, kwargs),
                                     zygote=False)
                    return self.connection_info
                except ZygoteUnavailable as exc:
                    log.warning("kernel %s starts as the server's child (it will not outlive "
                                "it): %s", self.kernel_id, exc)
                    await self._abandon()
            info: KernelConnectionInfo = await super().launch_kernel(cmd, **kwargs)
            return info
        finally:  # the child has its copies (or there is no child)
            self._close_pending()
            if self.stderr is not None:
                self.stderr.launched()

    def _host_launch(self, cmd: list[str], kwargs: dict[str, Any]) -> tuple[list[str],
                                                                          dict[str, Any]]:
        """The kernel's command and pre_launch's keyword arguments → what the host spawns for
        a cold start (bubblewrap and the descriptors it reads, closed after the launch)."""
        sandbox, conf = self.sandbox, self.confinement
        assert sandbox is not None and conf is not None
        self._close_pending()
        launch = self._pending = sandbox.host_launch(cmd, conf, kwargs["env"])
        return launch.argv, {**kwargs, "env": launch.env, "executable": launch.executable,
                             "pass_fds": tuple(launch.fds),
                             "cwd": "/" if sandbox.enabled else str(conf.workdir)}

    async def _held(self, keeper: Keeper, pid: int, pidfd: int, *, zygote: bool) -> None:
        """A kernel its keeper started: ours to control by pidfd once it listens. A forked
        kernel that exits first raises ZygoteUnavailable (it is started cold); a cold one that
        does is left to the readiness wait to report, as any kernel that dies starting."""
        self.keeper, self.pid, self._pidfd = keeper, pid, pidfd
        self.pgid = pid  # it leads its own session
        self._mem_max = 0
        await forked.listening(self.connection_info, pidfd, raise_on_exit=zygote)
        if self.stderr is not None:  # its keeper relays its stderr (it outlives us)
            self.stderr.close()
            self.stderr = None

    def _close_pending(self) -> None:
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    async def _abandon(self) -> None:
        """Leave nothing of a held start that failed: no holder, nothing in the cgroup."""
        await self._release_nest(kill=True)
        self._kill_held()
        if self.cgroup is not None:
            self.cgroup.kill()
        self.pid, self.keeper = None, None

    def _kill_held(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            _close(self._pidfd)
            self._pidfd = None

    async def _release_nest(self, kill: bool) -> None:
        nest, self.nest = self.nest, None
        if nest is not None:
            await nest.release(kill)

    # -- process control ------------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self._pidfd is not None or bool(super().has_process)

    @property
    def _by_keeper(self) -> bool:
        return self.keeper is not None or self._pidfd is not None or bool(self.gone_reason)

    async def poll(self) -> int | None:
        if not self._by_keeper:
            return await super().poll()
        if self._pidfd is None:
            return KILLED if self._exit is None else self._exit
        if not forked.exited(self._pidfd):
            return None
        return await self._reaped()

    async def _reaped(self) -> int:
        if self._exit is not None:
            return self._exit
        code = None
        for _ in range(int(EXIT_REPORT_WAIT_S / 0.01)):
            code = self.keeper.exit_status(int(self.pid)) if self.keeper and self.pid else None
            if code is not None:
                break
            await asyncio.sleep(0.01)
        self._exit = KILLED if code is None else code
        return self._exit

    async def wait(self) -> int | None:
        if not self._by_keeper:
            return await super().wait()
        pidfd = self._pidfd
        if pidfd is None:
            return KILLED if self._exit is None else self._exit
        if not forked.exited(pidfd):
            await forked.readable(pidfd)
        code = await self._reaped()
        _close(pidfd)
        self._pidfd = None
        return code

    async def send_signal(self, signum: int) -> None:
        if not self._by_keeper:
            await super().send_signal(signum)
            return
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    async def kill(self, restart: bool = False) -> None:
        if not self._by_keeper:
            await super().kill(restart=restart)
            return
        await self.send_signal(signal.SIGKILL)
        await self._release_nest(kill=True)  # takes the sandbox's PID namespace down with it

    async def terminate(self, restart: bool = False) -> None:
        if not self._by_keeper:
            await super().terminate(restart=restart)
            return
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        self._cpu_before += self._tree_cpu()
        await self._release_nest(kill=True)
        self._kill_held()
        self._close_pending()
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

    def detach(self) -> None:
        """Let go of the kernel without stopping it (the server stops, the kernel stays with its
        keeper for the next server): our descriptors and its stderr relay close."""
        if self._pidfd is not None:
            _close(self._pidfd)
            self._pidfd = None
        if self.nest is not None:
            self.nest.detach()
            self.nest = None
        self._close_pending()
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    # -- persistence (jupyter_client's hooks) ---------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        conn = dict(info.get("connection_info") or {})
        for k, v in conn.items():  # JSON: the key and curve keys are bytes
            if isinstance(v, bytes):
                conn[k] = v.decode()
        info["connection_info"] = conn
        info.update(
            keeper=None if self.keeper is None else self.keeper.handle(),
            forked=self.from_zygote,
            nest=None if self.nest is None else {"pid": self.nest.pid,
                                                 "keeper": self.nest.keeper.handle()},
            cgroup=None if self.cgroup is None else {
                "version": self.cgroup.version,
                "dirs": {k: str(v) for k, v in self.cgroup.dirs.items()}},
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Take over a kernel another server process started: re-open its cgroup by path and
        reach its keeper, which hands us a pidfd (or tells how the kernel ended)."""
        await super().load_provisioner_info(provisioner_info)
        info = provisioner_info
        self.from_zygote = bool(info.get("forked"))
        cg = info.get("cgroup")
        if cg:
            self.cgroup = KernelCgroup(cg["version"], {k: Path(v) for k, v in cg["dirs"].items()})
        handle = info.get("keeper")
        if not handle or not self.pid:
            self.gone_reason = "it was the stopped server's own child, and died with it"
            return
        try:
            keeper = await reach(handle)
            pidfd, status = await keeper.adopt(int(self.pid))
        except ZygoteUnavailable as exc:
            self.gone_reason = str(exc)
            return
        self.keeper = keeper
        if pidfd is None:
            self._exit = status
            self.gone_reason = f"it exited (status {status}) while no server watched it"
            return
        self._pidfd = pidfd
        nest = info.get("nest")
        if nest:
            self.nest = await forked.Nest.adopt(nest["keeper"], int(nest["pid"]))

    # -- usage ----------------------------------------------------------------------------------

    def _processes(self) -> list[psutil.Process]:
        if not self.pid or not self.has_process:
            return []
        cg = self.cgroup
        pids = cg.pids() if cg is not None else set()
        if cg is not None and not pids and self._pidfd is not None and forked.exited(self._pidfd):
            # Killed through its cgroup (a one-shot's, before its usage is read): nothing is
            # left, and the walk below would read every process of the host to find that out.
            return []
        if pids:
            # The cgroup lists the kernel's processes; walking children(recursive=True) reads
            # every process of the host (a tenth of the server's CPU per one-shot).
            procs = []
            for pid in sorted(pids):
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
            return procs
        try:
            root = psutil.Process(int(self.pid))
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _tree_cpu(self) -> float:
        total = 0.0
        for p in self._processes():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def usage(self) -> Usage:
        """CPU and memory from the kernel's cgroup when it has one (everything that ever ran
        in it, reaped children and restarts included), else from its live process tree; I/O
        from the tree. A remote provisioner answers this from where its kernel runs."""
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
            cpu = self._cpu_before + self._tree_cpu()
        return Usage(cpu_ms=int(cpu * 1000), mem_bytes=mem, mem_max_bytes=self._mem_max,
                     io_read_bytes=io_r, io_write_bytes=io_w)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
