"""The core assembled: one object the HTTP layer (or an embedded caller) starts and stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import batch, metrics
from .admission import Admission
from .datadir import ReplicaPresence
from .disk import Volumes
from .errors import AuthFailed
from .events import EventLog, run_key
from .executions import Executions
from .folders import Folders
from .gateway import Gateway
from .ipc import IPC_ROOT, ipc_root, sweep_ipc
from .job_sessions import JobSessions
from .kernels import Kernel, launch, spec_manager
from .keypairs import Keypair, Keypairs
from .languages import measure_versions
from .pool import REFILL_DELAY_S, KernelPool
from .runs import Run
from .sandbox import Confinement, Mount, Sandbox, SandboxUnavailable, base_environ
from .session import Session, now_iso
from .sessions import Sessions
from .settings import Settings
from .store import store_for
from .tasks import cancel_and_wait, spawn
from .zygote import for_interpreters as zygote_lines

log = logging.getLogger(__name__)
# How often the keypair cache is re-read from the store (keys made or deactivated by the CLI).
KEYPAIR_RELOAD_S = 5.0
# A forked kernel is ~50 ms of CPU: the pool refills once the execution that took a kernel has
# had the CPU for its own few milliseconds (at once, the refill slowed that execution by ~40%).
ZYGOTE_REFILL_DELAY_S = 0.05


@dataclass
class Started:
    first_keypair: Keypair | None  # created on an empty data dir, to be shown once


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Raises SandboxUnavailable. The data dir (SQLite, keypair secrets, every session's
        # files) is masked in kernels should the operator put it under a bound tree.
        self.sandbox = Sandbox(settings.sandbox, hide=(settings.data_dir,),
                               pids=settings.max_pids, uid=settings.sandbox_uid)
        if settings.python_env is not None:
            self.sandbox.add_python_env(settings.python_env)
        # SQLite in the data dir, or PostgreSQL (KB_DATABASE_URL); bridge/store/migrations.py
        # holds every table.
        self.store = store_for(settings)
        # With PostgreSQL, replicas share the data dir: each announces itself with a lease.
        self.presence = (ReplicaPresence(self.store) if self.store.dialect == "postgres"
                         else None)
        self.events = EventLog(self.store)
        self.keypairs = Keypairs(self.store, settings.default_concurrency)
        self._keypair_watch: asyncio.Task[None] | None = None
        self.language_versions: asyncio.Task[dict[str, str]] | None = None
        self.kernelspecs = spec_manager()
        # The keepers (the plain one, and zygotes unless KB_ZYGOTE=off): the parents of every
        # kernel, outliving this process. Their environment: a kernel's, without any client's.
        pythons = [sys.executable, settings.python_interpreter or sys.executable]
        self.zygotes = zygote_lines(base_environ({}, self.sandbox.tool_path),
                                    settings.zygote_max_forks, pythons,
                                    fork=settings.zygote == "on", sockets_dir=IPC_ROOT)
        # New sessions that fit take a pre-started kernel (bridge/pool.py), whatever the dialect.
        self.volumes = Volumes(settings)  # session dirs and folders with a disk quota
        refill = ZYGOTE_REFILL_DELAY_S if settings.zygote == "on" else REFILL_DELAY_S
        self.pool = KernelPool(settings, self.start_kernel, volumes=self.volumes,
                               refill_delay=refill)
        # Every kernel a keypair holds, whatever the dialect, is admitted here first.
        self.admission = Admission(settings.host_memory_budget_bytes,
                                   lambda key: self.keypairs.get(key).concurrency)
        self.sessions = Sessions(settings, self.store, self.keypairs, self.start_kernel,
                                 pool=self.pool, volumes=self.volumes, admission=self.admission)
        self.sessions.on_submit.append(self._stream_run)
        self.executions = Executions(settings, self.store, self.sessions, events=self.events,
                                     start_kernel=self.start_kernel)
        self.folders = Folders(self.store, settings.folders_dir, now_iso, self._keypair_exists,
                               self.volumes)
        self.folders.in_use = self._mounted_in
        self.folders.own = self.sandbox.own
        self.gateway = Gateway(self.sessions, self.kernelspecs)
        self.jobs = JobSessions(settings, self.store, self.keypairs, self.sessions,
                                open_ttl=settings.job_open_ttl_s, events=self.events)
        metrics.watch(self)

    async def start_kernel(self, spec: str, confinement: Confinement) -> Kernel:
        """The one launch function: every kernel of every dialect starts here."""
        started = time.monotonic()
        try:
            return await launch(spec, confinement, self.sandbox, self.kernelspecs,
                                self.settings.kernel_start_timeout,
                                python=self.settings.python_interpreter, zygotes=self.zygotes)
        except Exception:
            metrics.KERNEL_START_FAILURES.labels(spec).inc()
            raise
        finally:
            metrics.KERNEL_STARTS.labels(spec).observe(time.monotonic() - started)

    async def mounts_for(self, access_key: str, specs: list[str]) -> tuple[Mount, ...]:
        """Resolve ``name`` / ``name:alias`` mount specs to this keypair's folders.

        Raises NotFound for a folder the keypair cannot see.
        """
        return await self.folders.mounts(access_key, specs)

    def batch_run(self, session: Session, options: dict[str, Any], run_id: str | None) -> Run:
        """A batch run (clean → build → exec) for ``session``. Raises InvalidRequest."""
        opts = batch.BatchOptions.parse(options, session.language)

        async def start_charged(spec: str, confinement: Confinement) -> Kernel:
            # The bash kernel has its own cgroup with the session's cap: charge it too.
            ticket = session.ticket
            if ticket is not None:
                self.admission.grow(ticket, confinement.mem_bytes)  # HostBudgetExceeded
            try:
                return await self.start_kernel(spec, confinement)
            except BaseException:
                if ticket is not None:
                    self.admission.shrink(ticket, confinement.mem_bytes)
                raise

        return self.sessions.new_run(session, "batch", "", batch.program(
            session, opts, start_charged), run_id=run_id, options=options)

    def _stream_run(self, session: Session, run: Run) -> None:
        # Backend.AI runs get an event stream of their own; executions and jobs name theirs.
        if session.origin == "backendai":
            self.events.follow(run, run_key(session.id, run.run_id), session.access_key,
                               owner=session.id, name=session.name)

    async def _keypair_exists(self, access_key: str) -> bool:
        # Keys made by `kernel-bridge keys create` while we run are found on a re-read.
        try:
            await self.keypairs.authenticate_access(access_key)
        except AuthFailed:
            return False
        return True

    def _mounted_in(self, host: Path) -> str | None:
        for s in self.sessions.all():
            if any(m.host == host for m in s.mounts):
                return s.name
        return None

    async def start(self) -> Started:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The data dir holds HMAC secrets and every session's files: owner only.
        os.chmod(self.settings.data_dir, 0o700)
        self.settings.sessions_dir.mkdir(exist_ok=True)
        self.settings.folders_dir.mkdir(exist_ok=True)
        await asyncio.to_thread(self.volumes.probe)
        self.volumes.require(self.sandbox.enabled)  # Raises QuotaUnavailable
        log.info("%s", self.volumes.describe())
        await asyncio.to_thread(self.volumes.mount_folders, self.settings.folders_dir)
        # Kernels a server that is gone left running (with their keepers), their IPC dirs and
        # its keepers' sockets. TODO(lifecycle): after re-adoption, keep what was adopted.
        with contextlib.suppress(SandboxUnavailable):  # each kernel's start then says why
            await asyncio.to_thread(ipc_root)
        await asyncio.to_thread(sweep_ipc, set(), IPC_ROOT, self.sandbox.cgroups)
        # Kernel cgroups left empty by a server that died or by the sweep.
        self.sandbox.cgroups.sweep()
        await self.store.open()  # Raises StartupRefused
        log.info("state in %s", self.store.describe())
        if self.presence is not None:
            others = await self.presence.start()
            log.info("replica %s; other live replicas: %s", self.presence.id,
                     ", ".join(others) or "none")
        await self.keypairs.load()
        first = None
        if not self.keypairs.all():
            first = await self.keypairs.create()
        self._keypair_watch = spawn(self.keypairs.watch(KEYPAIR_RELOAD_S))
        await self.events.start()  # before the records whose streams it ends
        await self.sessions.start()
        await self.jobs.start()  # after sessions: a reloaded job may start a kernel
        await self.executions.start()  # marks executions cut off by the last stop as failed
        for line in self.zygotes.values():
            line.start()
        self.pool.start()
        # Asked once, off the start path: the first GET …/execute/languages awaits it.
        self.language_versions = spawn(measure_versions())
        return Started(first_keypair=first)

    def runs_in_flight(self) -> int:
        """Runs executing right now, in every dialect (what a graceful shutdown waits for)."""
        return sum(1 for s in self.sessions.all() if s.queue.current is not None)

    async def drain(self, grace: float, hurry: asyncio.Event) -> None:
        """Let running runs finish, up to ``grace`` seconds or until ``hurry`` is set."""
        deadline = asyncio.get_running_loop().time() + grace
        while self.runs_in_flight() and not hurry.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("shutdown grace over with %d runs in flight", self.runs_in_flight())
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), timeout=min(0.1, left))

    async def stop(self) -> None:
        await cancel_and_wait(self._keypair_watch)
        await cancel_and_wait(self.language_versions)
        await self.jobs.stop()  # records cut-short jobs before their kernels go
        await self.executions.stop()  # likewise for async executions
        await self.sessions.stop()
        await self.events.stop()
        await self.pool.stop()
        await asyncio.gather(*(line.close() for line in self.zygotes.values()))
        await asyncio.to_thread(self.volumes.unmount_folders, self.settings.folders_dir)
        if self.presence is not None:
            await self.presence.stop()
        await self.store.close()
