"""The session registry: create, find, adopt, restart and destroy sessions, and queue their runs.

The registry holds every live session by id. Around it: the model (:mod:`bridge.session`), the
worker that runs each session's queue one run at a time, FIFO (:mod:`bridge.worker`), the reaper
that ends idle sessions and spent CPU credit (:mod:`bridge.reaper`), and their rows in the store
(:mod:`bridge.session_records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from . import adoption, metrics
from .admission import Admission, Holder, Ticket
from .disk import Volumes
from .errors import InvalidRequest, SessionNotFound
from .kernels import Kernel, Usage
from .keypairs import Keypairs
from .languages import Language
from .outcomes import ExitRule
from .reaper import Reaper
from .runs import Program, Run, code_program
from .sandbox import Confinement, Mount
from .session import MAIN, Attached, Limits, Session, SessionState
from .session_records import SessionRecords
from .settings import Settings
from .store import Store
from .tasks import cancel_and_wait
from .worker import Worker

# Starts a kernel for a session (spec, confinement) → Kernel: the one launch function.
KernelFactory = Callable[[str, Confinement], Any]


class KernelSource(Protocol):
    """Where a new session's kernel may come from before a cold start (the warm pool)."""

    async def take(self, language: Language, confinement: Confinement) -> Kernel | None:
        """A running kernel confined like ``confinement`` but in its own working dir, or None."""
        ...


class Sessions:
    """The registry: every live session, by owner. Raises the core's errors, never HTTP ones."""

    def __init__(self, settings: Settings, store: Store, keypairs: Keypairs,
                 start_kernel: KernelFactory, pool: KernelSource | None = None,
                 volumes: Volumes | None = None,
                 admission: Admission | None = None) -> None:
        self.settings = settings
        self.volumes = volumes or Volumes(settings)  # working dirs with a disk quota
        self.store = store
        self.keypairs = keypairs
        self.admission = admission or Admission(
            settings.host_memory_budget_bytes, lambda key: keypairs.get(key).concurrency)
        self._start_kernel = start_kernel
        self.pool = pool
        self._by_id: dict[str, Session] = {}
        self.records = SessionRecords(store)
        self.worker = Worker(self.records, self.restart, self.discard)
        self.reaper = Reaper(settings.reaper_interval_s, lambda: self._by_id.values(),
                             self.discard)
        self.on_terminated: list[Callable[[Session], Any]] = []
        self.on_submit: list[Callable[[Session, Run], Any]] = []  # e.g. event streams

    # -- lifecycle of the registry ----------------------------------------------------------

    async def start(self, adopt: adoption.AdoptKernel | None = None, *,
                    exclusive: bool = True) -> adoption.Adopted:
        """Re-adopt every session a previous server left alive that is this server's (with
        replicas: the rows recorded as this replica's, i.e. claimed from replicas that died;
        bridge/adoption.py); only then, ``exclusive`` and alone on the sessions dir, sweep the
        session dirs no live session owns (replicas share the dir: a dead replica's dirs wait
        for whoever claims its sessions)."""
        adopted = await adoption.readopt(self, adopt, owner=self.records.owner)
        if exclusive and self.records.owner is None:
            await asyncio.to_thread(self.volumes.sweep_sessions, self.settings.sessions_dir,
                                    adopted.workdirs)
        self.reaper.start()
        return adopted

    def registered(self, session_id: str) -> bool:
        """Whether the registry holds that session (alive or on its way out)."""
        return session_id in self._by_id

    def readopt(self, session: Session, kernel: Kernel | None) -> None:
        """A session rebuilt from its row joins the registry with ``kernel`` (None: its kernel
        is gone and it stays in ERROR until a restart). Its place is granted whatever the
        limits say now: the kernel already runs (or its files wait)."""
        if kernel is not None:
            session.kernels[MAIN] = Attached.start(kernel)
        session.ticket = self.admission.adopt(
            session.access_key, (session.name, session.id, session.origin),
            session.limits.mem_kib * 1024)
        self.adopt(session)

    async def stop(self, keep_kernels: bool = False) -> None:
        await self.reaper.stop()
        if keep_kernels:
            await asyncio.gather(*(self._detach(s) for s in self.all()),
                                 return_exceptions=True)
            return
        await asyncio.gather(*(self.destroy(s, "server-shutdown") for s in self.all()),
                             return_exceptions=True)
        # Destroys already under way (a timer's, a client's) end before the server does, and
        # one cut short (its task cancelled by the shutdown) still loses its dir: a mount.
        for s in list(self._by_id.values()):
            async with s.lock:
                if not s.alive and s.id in self._by_id:
                    await self.volumes.remove(s.workdir)

    async def _detach(self, session: Session) -> None:
        """Let go of the session's language kernel, leaving it running (and its record, dir
        and row) for the next server; other kernels (batch's bash) are not adopted and stop."""
        async with session.lock:
            await cancel_and_wait(session.queue.task)
            attached, session.kernels = session.kernels, {}
            main = attached.pop(MAIN, None)
            await asyncio.gather(*(a.stop(True) for a in attached.values()),
                                 return_exceptions=True)
            if main is not None:
                await main.channels.stop()
                main.kernel.detach()

    # -- queries ------------------------------------------------------------------------------

    def all(self, access_key: str | None = None) -> list[Session]:
        return [s for s in self._by_id.values()
                if s.alive and (access_key is None or s.access_key == access_key)]

    def find(self, access_key: str, ident: str) -> Session | None:
        s = self._by_id.get(ident)
        if s is not None and s.alive and s.access_key == access_key:
            return s
        for s in self.all(access_key):
            if s.name == ident:
                return s
        return None

    def get(self, access_key: str, ident: str) -> Session:
        """A live session of this keypair by name or id. Raises SessionNotFound."""
        s = self.find(access_key, ident)
        if s is None:
            raise SessionNotFound(ident)
        return s

    # -- create / destroy / restart -----------------------------------------------------------

    async def create(self, access_key: str, language: Language, *, name: str | None = None,
                     origin: str = "backendai", limits: Limits | None = None,
                     mounts: tuple[Mount, ...] = (), environ: dict[str, str] | None = None,
                     network: bool = False, on_timeout: str = "destroy",
                     ticket: Ticket | None = None, kernelspec: str | None = None) -> Session:
        """Start a session with a running kernel, admitted now, or by ``ticket`` (granted by
        :meth:`reserve` and ``admission.wait``; the session owns it from here, also when it
        fails to start). Raises QuotaExceeded, HostBudgetExceeded, LimitExceeded,
        KernelStartFailed."""
        sid = str(uuid.uuid4())
        try:
            limits = limits or self.default_limits()
            limits.check(self.settings)
            kp = self.keypairs.get(access_key)
            if not kp.is_active:
                raise InvalidRequest("This keypair is inactive and may not create sessions.")
            if network and not self.settings.allow_network:
                raise InvalidRequest("Network access for sessions is disabled on this server.")
            if ticket is None:
                ticket = self.reserve(access_key, (name or sid, sid, origin), limits,
                                      wait=False, origin=origin)
        except BaseException:
            if ticket is not None:
                self.admission.release(ticket)
            raise
        # A pooled kernel brings its own working dir; the session adopts it (_attach_main).
        workdir = self.settings.sessions_dir / sid
        session = Session(id=sid, name=name or sid, access_key=access_key, language=language,
                          origin=origin, limits=limits, workdir=workdir, mounts=mounts,
                          environ=dict(environ or {}), network=network, on_timeout=on_timeout,
                          kernelspec=kernelspec)
        session.ticket = ticket
        self._by_id[sid] = session
        try:
            await self._attach_main(session, fresh=True)
            await self.records.created(session)
        except BaseException:
            # Nothing half-made stays: not the kernel, not the dir, not the place.
            del self._by_id[sid]
            main = session.kernels.pop(MAIN, None)
            if main is not None:
                with contextlib.suppress(Exception):
                    await main.stop()
            self.admission.release(ticket)
            await self.volumes.remove(session.workdir)
            raise
        self.adopt(session)
        return session

    def adopt(self, session: Session) -> None:
        """Take ``session`` (its kernels attached, its row written) into the registry and start
        running its queue. Idle from now: a slow kernel start (a loaded machine), or the time a
        session was not in a registry, is not idleness to be reaped."""
        self._by_id[session.id] = session
        session.touch()
        self.worker.start(session)

    def reserve(self, access_key: str, holder: Holder, limits: Limits | None = None, *,
                wait: bool, origin: str = "backendai") -> Ticket:
        """A place and this session's memory cap (see :mod:`bridge.admission`); how many
        places a keypair has depends on the dialect asking (``Settings.concurrency_for``).
        Raises LimitExceeded, QuotaExceeded, HostBudgetExceeded."""
        limits = limits or self.default_limits()
        places = self.settings.concurrency_for(origin, self.keypairs.get(access_key).concurrency)
        return self.admission.reserve(access_key, holder, limits.mem_kib * 1024, wait=wait,
                                      places=places)

    def default_limits(self) -> Limits:
        t = self.settings.default_query_timeout_ms
        # Queries always have a deadline: the operator's KB_QUERY_TIMEOUT_S unless the older
        # KB_DEFAULT_QUERY_TIMEOUT_MS (which also sets the CPU credit) says otherwise.
        query_ms = t or int(self.settings.query_timeout_s * 1000)
        return Limits(query_timeout_ms=query_ms, max_cpu_credit_ms=t,
                      mem_kib=self.settings.default_mem_kib,
                      idle_timeout_s=self.settings.idle_timeout_s)

    async def _attach_main(self, session: Session, fresh: bool = False) -> None:
        # Only a new session may take a pooled kernel: a re-attached one keeps its files.
        kernel: Kernel | None = None
        if fresh and self.pool is not None:
            kernel = await self.pool.take(session.language, session.confinement())
            metrics.POOL_TAKES.labels(session.language.name,
                                      "miss" if kernel is None else "hit").inc()
        if kernel is None:
            if not session.workdir.exists():
                await self.volumes.make_session_dir(session.workdir)
            kernel = await self._start_kernel(session.language.kernelspec,
                                              session.confinement())
        session.workdir = kernel.confinement.workdir
        session.kernels[MAIN] = Attached.start(kernel)

    async def destroy(self, session: Session, reason: str = "user-requested", *,
                      now: bool = False) -> Usage:
        """Stop the session's kernels and remove its working dir; returns its last usage."""
        async with session.lock:
            if not session.alive:
                raise SessionNotFound(session.name)
            usage = session.usage()
            session.state = SessionState.TERMINATED
            session.state_reason = reason
            session.queue.close(reason)
            attached = list(session.kernels.values())
            session.kernels = {}
            metrics.kernels_stopped([a.kernel for a in attached], session.language.name)
            try:
                await asyncio.gather(*(a.stop(now) for a in attached), return_exceptions=True)
            finally:
                # The place is free once the kernels are gone, not before.
                if session.ticket is not None:
                    self.admission.release(session.ticket)
            try:
                await self.volumes.remove(session.workdir)
                await self.records.ended(session, reason, usage)
            finally:  # gone here even when its record cannot be written (the store is down)
                del self._by_id[session.id]
        for callback in self.on_terminated:
            with contextlib.suppress(Exception):
                callback(session)
        return usage

    async def restart(self, session: Session) -> None:
        """Restart the language kernel: globals gone, age and CPU credit go on, idle resets."""
        async with session.lock:
            if not session.alive:
                raise SessionNotFound(session.name)
            main = session.main
            if session.queue.running and main is not None:
                # The running run loses its kernel; end it rather than leave it hanging.
                with contextlib.suppress(Exception):
                    await main.kernel.interrupt()
            session.state = SessionState.RESTARTING
            try:
                if main is None:
                    await self._attach_main(session)
                else:
                    await main.kernel.restart(self.settings.kernel_start_timeout)
                    main.channels.rebind(main.kernel.client)
                    await main.channels.stop()
                    main.channels.start()
            finally:
                session.state = SessionState.RUNNING if session.alive else session.state
            session.touch()
            if session.alive:  # back from ERROR (a dead kernel) in the record too
                session.state_reason = ""
                await self.records.restarted(session)  # a new process: new handles too

    async def interrupt(self, session: Session) -> None:
        """Interrupt whatever the session's kernels are running (fire and forget)."""
        await asyncio.gather(*(a.kernel.interrupt() for a in session.kernels.values()),
                             return_exceptions=True)

    async def complete(self, session: Session, code: str, cursor_pos: int,
                       timeout: float = 5.0) -> list[str]:
        """The kernel's completions at ``cursor_pos``; [] if it has none in ``timeout``."""
        channels = session.liveness().channels
        try:
            async with asyncio.timeout(timeout):
                exchange = await channels.request(
                    "complete_request", {"code": code, "cursor_pos": cursor_pos},
                    until_idle=False)
        except TimeoutError:
            return []
        return [str(m) for m in exchange.content.get("matches", [])]

    # -- runs ---------------------------------------------------------------------------------

    async def submit(self, session: Session, run: Run) -> Run:
        """Queue a run (FIFO per session), recording it before anyone is told about it.
        Raises SessionNotFound, InvalidTransition, Conflict (see Session.add_run)."""
        if not session.alive:
            raise SessionNotFound(session.name)
        session.add_run(run)
        for hook in self.on_submit:
            hook(session, run)
        # Queue first: the kernel starts on the code while the record is written, and the
        # caller is answered only after the write (persist before answering, at no latency).
        # One turn of the loop before the write: an idle session's worker sends the request
        # now, before the store's thread contends with it for the interpreter.
        session.queue.put(run)
        await asyncio.sleep(0)
        await self.store.transaction([
            self.records.run_queued(session, run),
            self.keypairs.note_query(session.access_key),
        ])
        return run

    def query(self, session: Session, code: str, run_id: str | None = None, *,
              timeout: float | None = None, stdin: str | None = None,
              rule: ExitRule = ExitRule.QUERY) -> Run:
        """A run of ``code`` for this session (not yet submitted); its exit code by ``rule``."""
        return self.new_run(session, "query", code, code_program(session.liveness, rule),
                            run_id=run_id, timeout=timeout, stdin=stdin)

    def new_run(self, session: Session, mode: str, code: str, program: Program, *,
                run_id: str | None = None, options: dict[str, Any] | None = None,
                timeout: float | None = None, stdin: str | None = None) -> Run:
        if timeout is None:
            # No run without a deadline: a run that never ends would hold its place forever.
            timeout = session.limits.query_timeout_ms / 1000 or self.settings.query_timeout_s
        return Run(run_id=run_id or Run.new_id(), mode=mode, code=code, program=program,
                   options=options or {}, timeout=timeout, stdin=stdin,
                   output_limit=self.settings.output_limit)

    def kill_now(self, session: Session) -> bool:
        """SIGKILL everything in the session's kernels through their cgroups, ahead of the slow
        part of :meth:`destroy` (the kernels' reaping, the unmount, the record); False, and
        nothing done, unless every kernel has a cgroup. Then its place may be freed at once
        (:meth:`free_place`) instead of after the reaping.

        Why that is safe: a place counts a kernel that can run the tenant's code. Every process
        of a sandboxed kernel is in its cgroup, which the sandbox cannot leave (no /sys, a
        cgroup namespace, no mount), and the sandbox's PID-namespace init is in it too: once
        each of them has a SIGKILL pending none runs another instruction, and the namespace's
        other processes (one forked meanwhile included) die with its init. So a keypair never
        has more kernels able to run than places, and the memory its cap was charged for is
        being freed. A kernel without a cgroup (no sandbox) keeps its place until reaped."""
        cgroups = [a.kernel.cgroup for a in session.kernels.values()]
        if not cgroups or any(cg is None for cg in cgroups):
            return False
        for cg in cgroups:
            assert cg is not None
            cg.kill()
        return True

    def free_place(self, session: Session) -> None:
        """Give back the place of a session whose kernels :meth:`kill_now` killed (idempotent:
        :meth:`destroy` gives it back too)."""
        if session.ticket is not None:
            self.admission.release(session.ticket)

    async def discard(self, session: Session, reason: str, *, now: bool = False) -> None:
        """Destroy ``session`` unless it is already gone (reaped, closed by its client)."""
        with contextlib.suppress(SessionNotFound):
            await self.destroy(session, reason, now=now)
