"""The core assembled: one object the HTTP layer (or an embedded caller) starts and stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from . import adoption, batch, kernels, metrics
from .admission import Admission
from .adoption import Adopted
from .datadir import ReplicaPresence
from .disk import Volumes
from .errors import AuthFailed
from .events import EventLog, run_key
from .executions import Executions
from .folders import Folders
from .gateway import Gateway
from .ipc import IPC_ROOT, ipc_root, set_owner_scope, sweep_ipc
from .job_sessions import JobSessions
from .kernels import Kernel, launch, spec_manager
from .keypairs import Keypair, Keypairs
from .languages import measure_versions
from .pool import FORKED_STARTS_PER_CORE, PARALLEL_STARTS, REFILL_DELAY_S, KernelPool
from .replicas import OwnerKind, Replicas
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


def _cores() -> int:
    """The cores this process may run on (its affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _may_be_alive(replica_id: str) -> bool:
    """False for a replica id (``host:pid:…``) of this host whose process is gone."""
    host, _, rest = replica_id.partition(":")
    pid = rest.partition(":")[0]
    return host != socket.gethostname() or not pid.isdigit() or psutil.pid_exists(int(pid))


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
        self.presence = (ReplicaPresence(self.store, ttl_s=settings.lease_s)
                         if self.store.dialect == "postgres" else None)
        self.events = EventLog(self.store)
        self.keypairs = Keypairs(self.store, settings.default_concurrency)
        self.replicas = Replicas(self.store, settings.advertise_url,
                                 self.presence.id if self.presence is not None else None)
        self._keypair_watch: asyncio.Task[None] | None = None
        self._failover: asyncio.Task[None] | None = None
        self.language_versions: asyncio.Task[dict[str, str]] | None = None
        self.kernelspecs = spec_manager()
        set_owner_scope(settings.data_dir)  # what this server's IPC sweep may judge
        # The keepers (the plain one, and zygotes unless KB_ZYGOTE=off): the parents of every
        # kernel, outliving this process. Their environment: a kernel's, without any client's.
        pythons = [sys.executable, settings.python_interpreter or sys.executable]
        self.zygotes = zygote_lines(base_environ({}, self.sandbox.tool_path),
                                    settings.zygote_max_forks, pythons,
                                    fork=settings.zygote == "on", sockets_dir=IPC_ROOT)
        # New sessions that fit take a pre-started kernel (bridge/pool.py), whatever the dialect.
        self.volumes = Volumes(settings)  # session dirs and folders with a disk quota
        # Every kernel a keypair holds, whatever the dialect, is admitted here first.
        self.admission = Admission(settings.host_memory_budget_bytes,
                                   lambda key: self.keypairs.get(key).concurrency)
        forked = settings.zygote == "on"
        self.pool = KernelPool(
            settings, self.start_kernel, volumes=self.volumes,
            refill_delay=ZYGOTE_REFILL_DELAY_S if forked else REFILL_DELAY_S,
            parallel_starts=max(PARALLEL_STARTS, FORKED_STARTS_PER_CORE * _cores()) if forked
            else PARALLEL_STARTS, room=self._pool_room)
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
        self.adopted = Adopted()  # what the last start re-adopted
        self.jobs = JobSessions(settings, self.store, self.keypairs, self.sessions,
                                open_ttl=settings.job_open_ttl_s, events=self.events)
        if self.replicas.clustered:
            # What this replica starts is recorded as its own: other replicas forward to it.
            self.sessions.records.owner = self.replicas.id
            self.executions.owner = self.jobs.records.owner = self.replicas.id
            self.admission.elsewhere = self.replicas.held_elsewhere
            self.executions.shared_rate = self.replicas.count_rate
            self.replicas.runs_here = self._runs_here
            self.events.turn = self.executions.turn = self.replicas.turn  # pruning, once
        metrics.watch(self)

    def _pool_room(self) -> int:
        """How many more kernels of the default cap the host budget could admit now: the
        warm pool's stock grows with demand only within it."""
        cap = self.settings.default_mem_kib * 1024
        if not cap:
            return 1 << 30  # uncapped kernels are charged nothing
        return max(self.admission.budget - self.admission.mem_used, 0) // cap

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

    async def adopt_kernel(self, record: dict[str, Any]) -> Kernel:
        """A kernel a previous server started, from its record. Raises KernelStartFailed
        (KernelGone: it is dead)."""
        return await kernels.adopt(record, sandbox=self.sandbox, ksm=self.kernelspecs,
                                   timeout=self.settings.kernel_start_timeout,
                                   zygotes=self.zygotes)

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
        with contextlib.suppress(SandboxUnavailable):  # each kernel's start then says why
            await asyncio.to_thread(ipc_root)
        await self.store.open()  # Raises StartupRefused
        log.info("state in %s", self.store.describe())
        others: list[str] = []
        if self.presence is not None:
            others = await self.presence.start()
            log.info("replica %s; other live replicas: %s", self.presence.id,
                     ", ".join(others) or "none")
        await self.keypairs.load()
        await self.replicas.start()
        first = None
        if not self.keypairs.all():
            first = await self.keypairs.create()
        self._keypair_watch = spawn(self.keypairs.watch(KEYPAIR_RELOAD_S))
        # Replicas: what dead replicas (or this one's previous life) left unfinished is ours now;
        # what live ones own stays theirs.
        await self.replicas.claim_orphans()
        clustered = self.replicas.clustered
        await self.events.start(end_open=not clustered)  # before the records whose streams it ends
        # Other live replicas on this database run their own sessions: only this replica's rows
        # (claimed above) are re-adopted, and no shared dir is swept. A lease left by a server of
        # this host that is gone (this one's predecessor, killed) is no live replica.
        live = [o for o in others if _may_be_alive(o)]
        self.adopted = await self.sessions.start(self.adopt_kernel, exclusive=not live)
        log.info("re-adopted %d session(s) in %.2f s; %d left in ERROR (kernel gone), "
                 "%d run(s) cut short by the last stop ended", len(self.adopted.sessions),
                 self.adopted.seconds, len(self.adopted.dead), self.adopted.runs_ended)
        if not clustered:
            # Only now: what the adopted kernels use is kept; kernels a server that is gone
            # left running and nobody adopted (pooled ones, one-shots, half-made sessions) go
            # with their IPC dirs and keepers' sockets, then the cgroups left empty. (Replicas
            # on one host leave a dead peer's kernels to whoever claims its sessions.)
            await asyncio.to_thread(sweep_ipc, self.adopted.ipc_dirs, IPC_ROOT,
                                    self.sandbox.cgroups)
            self.sandbox.cgroups.sweep()
        await self.jobs.start()  # after sessions: a reloaded job may start a kernel
        await self.executions.start()  # marks executions cut off by the last stop as failed
        if clustered:
            await self.events.end_orphans()
            self._failover = spawn(self.replicas.watch(self.settings.lease_s / 3,
                                                       self._adopt_claimed))
        for line in self.zygotes.values():
            line.start()
        self.pool.start()
        # Asked once, off the start path: the first GET …/execute/languages awaits it.
        self.language_versions = spawn(measure_versions())
        return Started(first_keypair=first)

    def _runs_here(self, kind: OwnerKind, access_key: str, ident: str) -> bool:
        """Whether this replica runs what a route names (no database trip for its own)."""
        if kind in ("session", "kernel"):
            return self.sessions.find(access_key, ident) is not None
        if kind == "sandbox_session":
            return any(s.name == ident and s.origin == "sandbox"
                       for s in self.sessions.all(access_key))
        return False

    async def _adopt_claimed(self) -> None:
        """A replica died and this one claimed what it owned: run it from here. Its sessions'
        kernels are adopted where this host reaches them (same host: their keepers; a remote
        provisioner's kernel over its connection info), state intact; others are left in ERROR
        with a reason (bridge/adoption.py)."""
        adopted = await adoption.readopt(self.sessions, self.adopt_kernel,
                                         owner=self.replicas.id)
        log.info("claimed from a lost replica: %d session(s) re-adopted, %d left in ERROR",
                 len(adopted.sessions), len(adopted.dead))
        await self.jobs.adopt()  # queued jobs run here, once: the claim moved them
        await self.executions.adopt()
        await self.events.end_orphans()

    def runs_in_flight(self) -> int:
        """Runs executing right now, in every dialect (what a graceful shutdown waits for)."""
        # A job between its record and its run holds no session's run yet: counted as well.
        return max(sum(1 for s in self.sessions.all() if s.queue.current is not None),
                   self.jobs.jobs_running)

    async def drain(self, grace: float, hurry: asyncio.Event) -> None:
        """Let running runs finish, up to ``grace`` seconds or until ``hurry`` is set."""
        deadline = asyncio.get_running_loop().time() + grace
        self.jobs.pause()  # queued jobs are the next server's (or cancelled by the stop)
        while self.runs_in_flight() and not hurry.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("shutdown grace over with %d runs in flight", self.runs_in_flight())
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), timeout=min(0.1, left))

    async def stop(self) -> None:
        await cancel_and_wait(self._failover)
        await cancel_and_wait(self._keypair_watch)
        await cancel_and_wait(self.language_versions)
        await self.jobs.stop()  # records cut-short jobs before their kernels go
        await self.executions.stop()  # likewise for async executions
        # --keep-kernels: the sessions' kernels stay up, detached, for the next server.
        await self.sessions.stop(keep_kernels=self.settings.keep_kernels)
        await self.events.stop()
        await self.pool.stop()
        keep = self.settings.keep_kernels
        await asyncio.gather(*(line.close(keep) for line in self.zygotes.values()))
        # Kept kernels may have folders bound: they stay mounted for the next server, as a
        # killed server's do (mount_folders keeps a mounted folder as it is). Replicas on this
        # host share the folders' mounts: the last one to stop unmounts them.
        if not keep and not await self.replicas.others_on_this_host():
            await asyncio.to_thread(self.volumes.unmount_folders, self.settings.folders_dir)
        if self.presence is not None:
            await self.presence.stop()
        await self.store.close()
