"""The session registry: create, find, restart, destroy and reap sessions, and run their runs.

Runs of a session execute one at a time, FIFO, on the session's worker task. Idle and CPU-credit
limits are enforced by the registry's reaper, never by request handlers. The model itself is
:mod:`bridge.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from . import adoption, metrics
from .admission import Admission, Holder, Ticket
from .channels import Channels
from .disk import Volumes
from .errors import (
    Conflict,
    InvalidRequest,
    InvalidTransition,
    RunNotFound,
    SessionNotFound,
)
from .kernels import Kernel, Usage
from .keypairs import Keypairs
from .languages import Language
from .runs import Program, Run, RunState
from .sandbox import Confinement, Mount
from .session import Limits, Session, SessionState, now_iso
from .settings import Settings
from .store import Store, dumps
from .tasks import cancel_and_wait, spawn

log = logging.getLogger(__name__)

# Starts a kernel for a session (spec, confinement) → Kernel: the one launch function.
KernelFactory = Callable[[str, Confinement], Any]


class KernelSource(Protocol):
    """Where a new session's kernel may come from before a cold start (the warm pool)."""

    async def take(self, language: Language, confinement: Confinement) -> Kernel | None:
        """A running kernel confined like ``confinement`` but in its own working dir, or None."""
        ...


async def query_program(run: Run, session: Session) -> None:
    outcome = await run.step(session.liveness(), run.code)
    # Backend.AI: a query on a kernel with global state exits 0 whatever the code raised;
    # process kernels report their program's exit code.
    run.finish(outcome.kernel_exit_code or 0)


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
        self._reaper: asyncio.Task[None] | None = None
        self.on_terminated: list[Callable[[Session], Any]] = []
        self.on_submit: list[Callable[[Session, Run], Any]] = []  # e.g. event streams

    # -- lifecycle of the registry ----------------------------------------------------------

    async def start(self, adopt: adoption.AdoptKernel | None = None) -> adoption.Adopted:
        """Re-adopt every session a previous server left alive (bridge/adoption.py); only
        then sweep the session dirs no live session owns."""
        adopted = await adoption.readopt(self, adopt)
        await asyncio.to_thread(self.volumes.sweep_sessions, self.settings.sessions_dir,
                                adopted.workdirs)
        self._reaper = asyncio.create_task(self._reap_forever())
        return adopted

    def attach_adopted(self, session: Session, kernel: Kernel) -> None:
        session.kernel = kernel
        session.channels = Channels(kernel.client)
        session.channels.start()

    def register_adopted(self, session: Session) -> None:
        """A rebuilt session joins the registry: its place, its worker, idle from now."""
        # Granted whatever the limits say now: the kernel already runs (or its files wait).
        session.ticket = self.admission.adopt(
            session.access_key, (session.name, session.id, session.origin),
            session.limits.mem_kib * 1024)
        self._by_id[session.id] = session
        session.last_activity = time.monotonic()
        session._worker = asyncio.create_task(self._work(session))

    async def stop(self, keep_kernels: bool = False) -> None:
        await cancel_and_wait(self._reaper)
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
        """Let go of the session's kernel, leaving it running (and its record, dir and row)
        for the next server; per-run extra kernels are not adopted and stop."""
        async with session.lock:
            if session._worker is not None:
                await cancel_and_wait(session._worker)
            extras = list(session.extra_kernels.values())
            session.extra_kernels = {}
            await asyncio.gather(*(self._stop_kernel(k, c, True) for k, c in extras),
                                 return_exceptions=True)
            if session.channels is not None:
                await session.channels.stop()
            detach = getattr(session.kernel, "detach", None)  # provisional: s2-kernels
            if detach is not None:
                detach()
            session.kernel, session.channels = None, None

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
                     ticket: Ticket | None = None) -> Session:
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
        # A pooled kernel brings its own working dir; the session adopts it (_attach_kernel).
        workdir = self.settings.sessions_dir / sid
        session = Session(id=sid, name=name or sid, access_key=access_key, language=language,
                          origin=origin, limits=limits, workdir=workdir, mounts=mounts,
                          environ=dict(environ or {}), network=network, on_timeout=on_timeout)
        session.ticket = ticket
        self._by_id[sid] = session
        try:
            await self._attach_kernel(session, fresh=True)
            # The row and the kernel's record together, before anyone is told: a server that
            # starts after this one died finds the kernel (bridge/adoption.py).
            await self.store.transaction([
                ("INSERT INTO sessions (id, name, access_key, language, origin, state, config,"
                 " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (sid, session.name, access_key, language.name, origin, session.state.value,
                  dumps(adoption.config_of(session)), session.created_at)),
                adoption.record_statement(session)])
        except BaseException:
            # Nothing half-made stays: not the kernel, not the dir, not the place.
            del self._by_id[sid]
            with contextlib.suppress(Exception):
                await self._stop_kernel(session.kernel, session.channels)
            self.admission.release(ticket)
            await self.volumes.remove(session.workdir)
            raise
        # Idle from now: a slow kernel start (a loaded machine) is not idleness to be reaped.
        session.last_activity = time.monotonic()
        session._worker = asyncio.create_task(self._work(session))
        return session

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

    async def _attach_kernel(self, session: Session, fresh: bool = False) -> None:
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
        session.kernel = kernel
        session.channels = Channels(kernel.client)
        session.channels.start()

    async def destroy(self, session: Session, reason: str = "user-requested", *,
                      now: bool = False) -> Usage:
        """Stop the session's kernels and remove its working dir; returns its last usage."""
        async with session.lock:
            if not session.alive:
                raise SessionNotFound(session.name)
            usage = session.usage()
            session.state = SessionState.TERMINATED
            session.state_reason = reason
            if session._worker is not None:
                session._worker.cancel()
            while not session._queue.empty():
                session._queue.get_nowait().cancel(f"Session ended: {reason}.")
            kernels = [(session.kernel, session.channels), *session.extra_kernels.values()]
            metrics.kernels_stopped([k for k, _ in kernels if k is not None],
                                    session.language.name)
            session.kernel, session.channels, session.extra_kernels = None, None, {}
            try:
                await asyncio.gather(*(self._stop_kernel(k, c, now) for k, c in kernels),
                                     return_exceptions=True)
            finally:
                # The place is free once the kernels are gone, not before.
                if session.ticket is not None:
                    self.admission.release(session.ticket)
            await self.volumes.remove(session.workdir)
            stats = {"cpu_used": usage.cpu_ms, "mem_max_bytes": usage.mem_max_bytes,
                     "mem_cur_bytes": usage.mem_bytes}
            await self.store.transaction([
                ("UPDATE sessions SET state='TERMINATED', state_reason=?, terminated_at=?,"
                 " stats=? WHERE id=?", (reason, now_iso(), dumps(stats), session.id)),
                adoption.forget_statement(session.id)])
            del self._by_id[session.id]
        for callback in self.on_terminated:
            with contextlib.suppress(Exception):
                callback(session)
        return usage

    @staticmethod
    async def _stop_kernel(kernel: Kernel | None, channels: Channels | None,
                           now: bool = False) -> None:
        if channels is not None:
            await channels.stop()
        if kernel is not None:
            await kernel.shutdown(now)

    async def restart(self, session: Session) -> None:
        """Restart the language kernel: globals gone, age and CPU credit go on, idle resets."""
        async with session.lock:
            if not session.alive:
                raise SessionNotFound(session.name)
            running = session.current is not None and not session.current.done
            if running and session.kernel is not None:
                # The running run loses its kernel; end it rather than leave it hanging.
                with contextlib.suppress(Exception):
                    await session.kernel.interrupt()
            session.state = SessionState.RESTARTING
            try:
                if session.kernel is None or session.channels is None:
                    await self._attach_kernel(session)
                else:
                    await session.kernel.restart(self.settings.kernel_start_timeout)
                    session.channels.rebind(session.kernel.client)
                    await session.channels.stop()
                    session.channels.start()
            finally:
                session.state = SessionState.RUNNING if session.alive else session.state
            session.last_activity = time.monotonic()
            if session.alive:  # back from ERROR (a dead kernel) in the record too
                await self.store.transaction([
                    ("UPDATE sessions SET state=?, state_reason='' WHERE id=?",
                     (session.state.value, session.id)),
                    adoption.record_statement(session)])  # a new process, new handles

    async def interrupt(self, session: Session) -> None:
        """Interrupt whatever the session's kernels are running (fire and forget)."""
        kernels = [k for k, _ in session.extra_kernels.values()]
        if session.kernel is not None:
            kernels.append(session.kernel)
        await asyncio.gather(*(k.interrupt() for k in kernels), return_exceptions=True)

    async def complete(self, session: Session, code: str, cursor_pos: int,
                       timeout: float = 5.0) -> list[str]:
        """The kernel's completions at ``cursor_pos``; [] if it has none in ``timeout``."""
        target = session.liveness()
        reply: dict[str, Any] = {}
        answered = asyncio.Event()

        def sink(channel: str, msg: Any) -> None:
            if channel == "shell" and msg["header"].get("msg_type") == "complete_reply":
                reply.update(msg["content"])
                answered.set()

        msg_id = target.channels.send("complete_request",
                                      {"code": code, "cursor_pos": cursor_pos}, sink)
        try:
            await asyncio.wait_for(answered.wait(), timeout)
        except TimeoutError:
            return []
        finally:
            target.channels.release(msg_id)
        return [str(m) for m in reply.get("matches", [])]

    # -- runs ---------------------------------------------------------------------------------

    async def submit(self, session: Session, run: Run) -> Run:
        """Queue a run (FIFO per session), recording it before anyone is told about it."""
        if not session.alive:
            raise SessionNotFound(session.name)
        if run.run_id in session.runs:
            raise InvalidTransition(f"run {run.run_id}", "new", "already submitted")
        waiting = session.current
        if waiting is not None and waiting.state is RunState.WAITING_INPUT:
            # Queued behind it, the new run would answer `continued` until someone answers.
            raise Conflict(f"Run {waiting.run_id} waits for input: answer it (mode 'input' "
                           "with that runId) or interrupt it before sending another run.")
        session.runs[run.run_id] = run
        for hook in self.on_submit:
            hook(session, run)
        session.num_queries += 1
        session.last_activity = time.monotonic()
        # Queue first: the kernel starts on the code while the record is written, and the
        # caller is answered only after the write (persist before answering, at no latency).
        session._queue.put_nowait(run)
        await self.store.transaction([
            ("INSERT INTO runs (id, session_id, run_id, mode, code, options, status, created_at)"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
             (str(uuid.uuid4()), session.id, run.run_id, run.mode, run.code,
              dumps(run.options), RunState.QUEUED.value, now_iso())),
            self.keypairs.note_query(session.access_key),
        ])
        return run

    def query(self, session: Session, code: str, run_id: str | None = None, *,
              timeout: float | None = None, stdin: str | None = None) -> Run:
        """A query run for this session (not yet submitted)."""
        async def program(run: Run) -> None:
            await query_program(run, session)

        return self.new_run(session, "query", code, program, run_id=run_id, timeout=timeout,
                            stdin=stdin)

    def new_run(self, session: Session, mode: str, code: str, program: Program, *,
                run_id: str | None = None, options: dict[str, Any] | None = None,
                timeout: float | None = None, stdin: str | None = None) -> Run:
        if timeout is None:
            # No run without a deadline: a run that never ends would hold its place forever.
            timeout = session.limits.query_timeout_ms / 1000 or self.settings.query_timeout_s
        return Run(run_id=run_id or Run.new_id(), mode=mode, code=code, program=program,
                   options=options or {}, timeout=timeout, stdin=stdin,
                   output_limit=self.settings.output_limit)

    def get_run(self, session: Session, run_id: str) -> Run:
        run = session.runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    async def _work(self, session: Session) -> None:
        while True:
            run = await session._queue.get()
            session.current = run
            try:
                await self._run_one(session, run)
            finally:
                # Only once the outcome is stored: a graceful shutdown waits for this.
                session.current = None
            if run.state is RunState.TIMED_OUT and session.on_timeout == "destroy":
                return

    async def _run_one(self, session: Session, run: Run) -> None:
        try:
            await run.execute()
        finally:
            session.last_activity = time.monotonic()
        # Before anything yields: a client told "finished, 130" must find the session in
        # ERROR when it looks next (poll() of a local kernel does not suspend).
        kernel = session.kernel
        died = run.state is RunState.FAILED and kernel is not None and not await kernel.is_alive()
        metrics.run_ended(run, session.language.name, died,
                          died and kernel is not None and _oom_killed(kernel))
        if died:
            session.state = SessionState.ERROR
            session.state_reason = "kernel-died"
            await self.store.execute(
                "UPDATE sessions SET state=?, state_reason=? WHERE id=?",
                (session.state.value, session.state_reason, session.id))
        await self.store.execute(
            "UPDATE runs SET status=?, exit_code=?, finished_at=? WHERE session_id=? AND"
            " run_id=?", (run.state.value, run.exit_code, now_iso(), session.id, run.run_id))
        # Keep only runs a client may still be reading; drop the old finished ones.
        if len(session.runs) > 64:
            for rid in [r for r, x in session.runs.items() if x.done][:-32]:
                del session.runs[rid]
        if run.state is RunState.TIMED_OUT:
            if session.on_timeout == "destroy":
                spawn(self._destroy_quietly(session, "exec-timeout"))
                return
            # Inline, not as a task: the next queued run must find the new kernel, not the
            # old one still busy with the timed-out code.
            await self._restart_quietly(session)

    async def _destroy_quietly(self, session: Session, reason: str) -> None:
        with contextlib.suppress(SessionNotFound):
            await self.destroy(session, reason)

    async def _restart_quietly(self, session: Session) -> None:
        try:
            await self.restart(session)
        except Exception:
            log.exception("restart of session %s failed", session.id)
            await self._destroy_quietly(session, "restart-failed")

    # -- the reaper ---------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_s)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper pass failed")

    async def reap(self) -> None:
        now = time.monotonic()
        for s in list(self._by_id.values()):
            if not s.alive or s.lock.locked() or s.kernel is None:
                continue  # (no kernel yet: still starting, and not idle however long it takes)
            if not s.busy and now - s.last_activity > s.limits.idle_timeout_s:
                await self._destroy_quietly(s, "idle-timeout")
            elif s.limits.max_cpu_credit_ms and s.usage().cpu_ms > s.limits.max_cpu_credit_ms:
                await self._destroy_quietly(s, "cpu-credit-exhausted")


def _oom_killed(kernel: Kernel) -> bool:
    cg = kernel.cgroup
    return cg is not None and cg.oom_kills() > 0
