"""The job-session manager: creates sessions, queues and runs their jobs, and fires their timers.

dedicated: one bridge session (one kernel, its state kept) runs the jobs one at a time, in order.
batch: each job gets a fresh ephemeral bridge session, destroyed when the job ends; jobs of all
the keypair's batch sessions run in parallel up to the keypair's concurrency, oldest first.

The reaper is one task that sleeps until the earliest stored deadline (or until a deadline
changes) and then fires what is due. Every change is written to SQLite before it is reported.
On start-up the records are reloaded: deadlines that passed while the server was down fire with
their own timestamps, jobs that were running are failed (their kernels died with the server),
and queued jobs run. A dedicated session's kernel cannot survive a restart: its record stays as
it was (state, timers, timestamps) with a note in state_reason, and its next job starts a fresh
kernel, so earlier in-memory state is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from .admission import Ticket
from .errors import BridgeError, Conflict, InvalidRequest, JobNotFound, SessionNotFound
from .events import EventLog, job_key
from .jobs import (
    DEFAULT_INTERACTIVE_TTL,
    FAILED_EXIT_CODE,
    JOB_COLUMNS,
    OPEN_TTL,
    SESSION_COLUMNS,
    Job,
    JobSession,
    JobStatus,
    State,
    iso,
    view_of,
)
from .keypairs import Keypairs
from .languages import resolve
from .session import Limits, Session, SessionState
from .sessions import Sessions
from .settings import Settings
from .store import Store
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

ORIGIN = "jobs"


class JobSessions:
    def __init__(self, settings: Settings, store: Store, keypairs: Keypairs,
                 sessions: Sessions, open_ttl: float = OPEN_TTL,
                 events: EventLog | None = None) -> None:
        self.settings = settings
        self.events = events  # each job's event stream (bridge.events)
        self.store = store
        self.keypairs = keypairs
        self.sessions = sessions
        self.open_ttl = open_ttl
        self._live: dict[str, JobSession] = {}  # not yet closed
        self._jobs: dict[str, Job] = {}  # queued or running
        self._batch_running: dict[str, int] = defaultdict(int)  # per access key
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._paused = False  # draining for a stop: queued jobs wait for the next server

    # -- start / stop -------------------------------------------------------------------------

    async def start(self) -> None:
        now = time.time()
        rows = await self.store.fetchall(
            f"SELECT {SESSION_COLUMNS} FROM job_sessions WHERE state != 'closed'")
        for row in rows:
            js = JobSession.from_row(row)
            jobs = [Job.from_row(r) for r in await self.store.fetchall(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE session_id=? AND status IN"
                " ('queued', 'running') ORDER BY seq", (js.id,))]
            js.next_seq = int((await self.store.fetchone(
                "SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM jobs WHERE session_id=?",
                (js.id,)) or {"n": 0})["n"])
            for job in jobs:
                if job.status is JobStatus.RUNNING:
                    job.end(JobStatus.FAILED, FAILED_EXIT_CODE, stdout=job.stdout,
                            stderr="The server restarted while this job ran: its output and "
                                   "exit code are lost (a kernel the new server re-adopted "
                                   "went on running it).\n", at=now)
                    await self._save_job(job)
                else:
                    js.queue.append(job)
                    self._jobs[job.id] = job
            if js.state is State.ACTIVE and not js.has_work and js.idle_deadline is None:
                js.idle_deadline = now + (js.interactive_ttl or 0)
            if js.mode == "dedicated":
                # Its kernel, re-adopted by the registry (bridge/adoption.py), state intact.
                js.kernel = self.sessions.find(js.access_key, js.id)
            self._live[js.id] = js
            await self._save(js)
        # Kernels of jobs that ended with the old server (a batch job's, a closed session's).
        owned = {js.kernel for js in self._live.values()}
        for orphan in [k for k in self.sessions.all() if k.origin == ORIGIN and k not in owned]:
            await self._drop_kernel(orphan, "its job ended with the server")
        # Deadlines that passed while the server was down fire now, stamped with their own time.
        await self._fire_due(now)
        for js in list(self._live.values()):
            await self._maybe_close(js)
            if js.state is not State.CLOSED and js.kernel is None and js.activated_at \
                    and js.mode == "dedicated":
                # Noted after the deadlines fired, so the note is the last word until the
                # session's next transition.
                js.state_reason += (f"; the server restarted at {iso(now)}: the kernel and "
                                    "its state are gone, the next job starts a fresh kernel")
                await self._save(js)
            self._pump(js)
        self._reaper = asyncio.create_task(self._reap_forever())

    def pause(self) -> None:
        """Start no more queued jobs (a graceful stop): running ones finish, queued ones stay
        queued in the store for the next server."""
        self._paused = True

    @property
    def jobs_running(self) -> int:
        return sum(len(js.running) for js in self._live.values())

    async def stop(self) -> None:
        """Stop timers and jobs; jobs cut short are recorded as failed (their kernels go too)."""
        await cancel_and_wait(self._reaper)
        tasks = [t for js in self._live.values() for t in js.tasks]
        if tasks and self._paused and not self.jobs_running:
            # Drained: what is left is jobs' last records being written; let them land.
            await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = time.time()
        for js in self._live.values():
            for job in list(js.running):
                run = job.run
                job.end(JobStatus.FAILED, FAILED_EXIT_CODE,
                        stdout=run.text("stdout") if run else "",
                        stderr=(run.text("stderr") if run else "")
                        + "The server shut down while this job ran.\n", at=now)
                js.job_ended(job, now)
                await self._save_job(job)
            await self._save(js)

    # -- queries ------------------------------------------------------------------------------

    async def get(self, access_key: str, ident: str) -> JobSession:
        """A job session of this keypair, or another dialect's live session seen as one.

        Raises SessionNotFound.
        """
        js = self._live.get(ident)
        if js is not None and js.access_key == access_key:
            return js
        row = await self.store.fetchone(
            f"SELECT {SESSION_COLUMNS} FROM job_sessions WHERE id=? AND access_key=?",
            (ident, access_key))
        if row is not None:
            return JobSession.from_row(row)
        foreign = self._foreign(access_key, ident)
        if foreign is None:
            raise SessionNotFound(ident)
        return view_of(foreign)

    def _foreign(self, access_key: str, ident: str) -> Session | None:
        s = self.sessions.find(access_key, ident)
        return s if s is not None and self._shown(s) else None

    @staticmethod
    def _shown(s: Session) -> bool:
        """Other dialects' sessions are shown, but not kernels that serve a single run: a job's
        or a one-shot Sandbox execution's (unnamed, so its name is its id)."""
        return s.origin != ORIGIN and not (s.origin == "sandbox" and s.name == s.id)

    async def all(self, access_key: str) -> list[JobSession]:
        """Every job session of this keypair (closed ones too) and its other live sessions,
        newest first."""
        rows = await self.store.fetchall(
            f"SELECT {SESSION_COLUMNS} FROM job_sessions WHERE access_key=?", (access_key,))
        found = [self._live.get(r["id"]) or JobSession.from_row(r) for r in rows]
        found += [view_of(s) for s in self.sessions.all(access_key) if self._shown(s)]
        return sorted(found, key=lambda js: js.started_at, reverse=True)

    async def jobs_of(self, js: JobSession) -> list[Job]:
        rows = await self.store.fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE session_id=? AND access_key=? ORDER BY seq",
            (js.id, js.access_key))
        return [self._jobs.get(r["id"]) or Job.from_row(r) for r in rows]

    async def get_job(self, access_key: str, job_id: str) -> Job:
        """Raises JobNotFound."""
        job = self._jobs.get(job_id)
        if job is not None and job.access_key == access_key:
            return job
        row = await self.store.fetchone(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=? AND access_key=?", (job_id, access_key))
        if row is None:
            raise JobNotFound(job_id)
        return Job.from_row(row)

    # -- commands -----------------------------------------------------------------------------

    async def create(self, access_key: str, mode: str, language: str, *, max_ttl: int,
                     interactive_ttl: int | None = None,
                     environment: dict[str, str] | None = None) -> JobSession:
        """Open a job session; a dedicated one starts its kernel now.

        Raises InvalidRequest (unknown or unavailable language), QuotaExceeded,
        KernelStartFailed.
        """
        lang = resolve(language)
        if not lang.available:
            raise InvalidRequest(f"Language {lang.name!r} is not available on this server.")
        if mode not in DEFAULT_INTERACTIVE_TTL:
            raise InvalidRequest(f"mode must be 'batch' or 'dedicated', not {mode!r}.")
        ittl = interactive_ttl if interactive_ttl is not None else min(
            DEFAULT_INTERACTIVE_TTL[mode], max_ttl)
        if ittl > max_ttl:
            raise InvalidRequest(f"interactive_ttl ({ittl}) must not exceed max_ttl ({max_ttl}).")
        js = JobSession(id=Job.new_id(), access_key=access_key, mode=mode, language=lang.name,
                        max_ttl=max_ttl, interactive_ttl=ittl, environment=dict(environment or {}))
        if mode == "dedicated":
            js.kernel = await self._new_kernel(js, js.id, js.environment)
        # The open TTL counts from when the session can take a job: a dedicated session's
        # kernel may take seconds to start on a loaded machine, and that wait is not the
        # client's idleness (the bridge's idle reaper counts from kernel ready too).
        js.open_deadline = time.time() + self.open_ttl
        try:
            await self._save(js)
        except BaseException:
            if js.kernel is not None:
                await self._drop_kernel(js.kernel, "job session not recorded")
            raise
        self._live[js.id] = js
        self._wake.set()
        return js

    async def submit(self, js: JobSession, code: str, *, stdin: str | None, timeout: float,
                     environment: dict[str, str] | None = None) -> Job:
        """Queue a job, recorded before it is reported. Raises Conflict (closed, draining or
        another dialect's session), InvalidRequest."""
        if js.origin != ORIGIN:
            raise Conflict(f"Session {js.id!r} belongs to the {js.origin} API; run code there.")
        if js.state is State.CLOSED or not js.accepting_jobs or js.id not in self._live:
            raise Conflict(f"Job session {js.id} is {js.state.value} and does not accept jobs "
                           f"(accepting_jobs={str(js.accepting_jobs).lower()}).")
        if environment and js.mode == "dedicated":
            raise InvalidRequest("A dedicated session's jobs share one kernel, so its environment"
                                 " is set once, when the session is created.")
        job = Job(id=Job.new_id(), session_id=js.id, access_key=js.access_key, seq=js.next_seq,
                  code=code, language=js.language, timeout=timeout, stdin=stdin,
                  environment=dict(environment or {}))
        await self._save_job(job)
        js.next_seq += 1
        js.queue.append(job)
        self._jobs[job.id] = job
        js.idle_deadline = None  # work is waiting: the interactive TTL does not run
        await self.keypairs.count_query(js.access_key)
        self._pump(js)
        return job

    async def set_accepting(self, js: JobSession, accepting: bool) -> None:
        """PATCH accepting_jobs. false: the session closes once its jobs have run.
        Raises Conflict."""
        if js.origin != ORIGIN:
            raise Conflict(f"Session {js.id!r} belongs to the {js.origin} API and always "
                           "accepts its own runs; close it to end it.")
        if js.state is State.CLOSED or js.id not in self._live:
            if accepting:
                raise Conflict(f"Job session {js.id} is closed.")
            return
        if accepting and js.expired:
            raise Conflict(f"Job session {js.id} reached its max_ttl and is closing.")
        js.accepting_jobs = accepting
        js.close_reason = None if accepting else (
            "accepting_jobs was set to false and no jobs remained")
        if not accepting:
            js.idle_deadline = None
        elif js.state is State.ACTIVE and not js.has_work:
            js.idle_deadline = time.time() + (js.interactive_ttl or 0)
        await self._save(js)
        await self._maybe_close(js)
        self._wake.set()

    async def close(self, js: JobSession, reason: str = "closed by request") -> None:
        """DELETE …/close: cancel queued jobs, stop accepting, close once running jobs end."""
        if js.origin != ORIGIN:
            s = self._foreign(js.access_key, js.id)
            if s is not None:
                with contextlib.suppress(SessionNotFound):
                    await self.sessions.destroy(s, "closed through the job-sessions API")
            return
        if js.state is State.CLOSED or js.id not in self._live:
            return
        await self._wind_down(js, reason)

    # -- running jobs -------------------------------------------------------------------------

    def _pump(self, js: JobSession) -> None:
        """Start whatever may start now."""
        if self._paused:
            return
        if js.mode == "dedicated":
            if not js.running and js.queue and js.state is not State.CLOSED:
                self._start(js, js.queue.popleft())
            return
        limit = self.keypairs.get(js.access_key).concurrency
        while self._batch_running[js.access_key] < limit:
            waiting = [s for s in self._live.values()
                       if s.access_key == js.access_key and s.mode == "batch" and s.queue]
            if not waiting:
                return
            oldest = min(waiting, key=lambda s: s.queue[0].created_at)
            self._batch_running[js.access_key] += 1
            self._start(oldest, oldest.queue.popleft())

    def _start(self, js: JobSession, job: Job) -> None:
        now = time.time()
        job.status, job.started_at = JobStatus.RUNNING, now
        js.job_started(job, now)
        self._wake.set()
        task = asyncio.create_task(self._run(js, job))
        js.tasks.add(task)
        task.add_done_callback(js.tasks.discard)

    async def _run(self, js: JobSession, job: Job) -> None:
        await self._save(js)
        await self._save_job(job)
        kernel: Session | None = None
        try:
            if js.mode == "dedicated":
                if js.kernel is None or not js.kernel.alive:
                    js.kernel = await self._new_kernel(js, js.id, js.environment)
                elif (js.kernel.state is SessionState.ERROR or js.kernel.kernel is None
                      or not await js.kernel.kernel.is_alive()):
                    # An earlier job killed it. Asked directly: the bridge may not have
                    # marked the session ERROR yet when the next job starts.
                    await self.sessions.restart(js.kernel)
                kernel = js.kernel
                timeout = job.timeout
            else:
                # A batch job's kernel takes one of the keypair's places like any other; it
                # waits for one within the job's timeout, which then covers the run too.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + job.timeout
                ticket = self.sessions.reserve(js.access_key, (job.id, job.id, "job"),
                                               self._limits(js), wait=True)
                await self.sessions.admission.wait(ticket, deadline)
                timeout = max(deadline - loop.time(), 0.001)  # what the wait left
                kernel = await self._new_kernel(js, job.id, job.environment, ticket)
            run = self.sessions.query(kernel, job.code, timeout=timeout,
                                      stdin=job.stdin or "")
            job.run = run
            if self.events is not None:
                self.events.follow(run, job_key(job.id), job.access_key, owner=job.id,
                                   ends_with_run=False)
            await self.sessions.submit(kernel, run)
            await run.wait()
            job.record(run)
        except asyncio.CancelledError:
            raise  # the server is stopping: stop() records the job
        except BridgeError as exc:
            job.end(JobStatus.FAILED, FAILED_EXIT_CODE, stderr=exc.message + "\n")
        except Exception:  # one broken job must not take the session down
            log.exception("job %s failed", job.id)
            job.end(JobStatus.FAILED, FAILED_EXIT_CODE, stderr="Internal error running the job.\n")
        self._jobs.pop(job.id, None)
        js.job_ended(job, job.completed_at or time.time())
        await self._save_job(job)
        await self._save(js)
        await self._maybe_close(js)
        self._wake.set()
        if js.mode == "batch":
            try:
                if kernel is not None:
                    await self._drop_kernel(kernel, "job finished")
            finally:
                # The slot is free once the job's kernel is gone, not before.
                self._batch_running[js.access_key] -= 1
        self._pump(js)

    def _limits(self, js: JobSession) -> Limits:
        # The job session's own timers end it; the bridge's idle reaper must not come first.
        return Limits(query_timeout_ms=0, max_cpu_credit_ms=0,
                      mem_kib=self.settings.default_mem_kib,
                      idle_timeout_s=float((js.max_ttl or 0) + self.open_ttl + 60))

    async def _new_kernel(self, js: JobSession, name: str, environ: dict[str, str],
                          ticket: Ticket | None = None) -> Session:
        """A kernel session admitted now (a dedicated session's: a refusal is the caller's
        429) or by ``ticket`` (a batch job's, granted after waiting)."""
        return await self.sessions.create(
            js.access_key, resolve(js.language), name=name, origin=ORIGIN,
            limits=self._limits(js), environ=environ, ticket=ticket,
            # dedicated: a timed-out job restarts the kernel and the session goes on;
            # batch: the job's kernel is thrown away anyway.
            on_timeout="restart" if js.mode == "dedicated" else "destroy")

    async def _drop_kernel(self, kernel: Session, reason: str) -> None:
        with contextlib.suppress(SessionNotFound):
            await self.sessions.destroy(kernel, reason)

    # -- closing and timers -------------------------------------------------------------------

    async def _wind_down(self, js: JobSession, reason: str, at: float | None = None) -> None:
        """Stop accepting, cancel queued jobs, close now or when the running ones end."""
        at = at or time.time()
        js.accepting_jobs = False
        js.close_reason = reason
        js.idle_deadline = None
        while js.queue:
            job = js.queue.popleft()
            self._jobs.pop(job.id, None)
            job.end(JobStatus.CANCELLED, FAILED_EXIT_CODE,
                    stderr=f"Cancelled before it started: {reason}.\n", at=at)
            await self._save_job(job)
        await self._save(js)
        await self._maybe_close(js, at)

    async def _maybe_close(self, js: JobSession, at: float | None = None) -> None:
        if js.state is State.CLOSED or js.accepting_jobs or js.has_work:
            return
        js.transition(State.CLOSED, js.close_reason or "closed", at)
        self._live.pop(js.id, None)
        await self._save(js)
        if js.kernel is not None:
            kernel, js.kernel = js.kernel, None
            await self._drop_kernel(kernel, "job session closed")

    async def _reap_forever(self) -> None:
        while True:
            self._wake.clear()
            deadlines = [d for js in self._live.values() if (d := js.next_deadline()) is not None]
            timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            try:
                await self._fire_due(time.time())
            except Exception:  # the reaper must outlive any one bad session
                log.exception("job-session reaper pass failed")
                await asyncio.sleep(1)

    async def _fire_due(self, now: float) -> None:
        """Fire every deadline that has passed, each session's in time order (after a restart
        several may have passed), stamping each transition with its deadline."""
        for js in list(self._live.values()):
            while (due := js.next_deadline()) is not None and due <= now:
                await self._fire(js, due)

    async def _fire(self, js: JobSession, due: float) -> None:
        if due == js.max_deadline:
            js.max_deadline = None
            await self._wind_down(js, f"max_ttl of {js.max_ttl} s reached", due)
        elif due == js.idle_deadline:
            js.idle_deadline = None
            if js.state is State.ACTIVE and not js.has_work:
                js.transition(State.INACTIVE, f"no job for the interactive_ttl of "
                                              f"{js.interactive_ttl} s", due)
                await self._save(js)
        else:
            js.open_deadline = None
            if js.state is State.OPEN:
                await self._wind_down(js, f"no job was submitted within {self.open_ttl:g} s",
                                      due)

    # -- rows -----------------------------------------------------------------------------------

    async def _save(self, js: JobSession) -> None:
        await self.store.execute(
            f"INSERT OR REPLACE INTO job_sessions ({SESSION_COLUMNS}) VALUES "
            f"({', '.join('?' * 21)})", js.row())

    async def _save_job(self, job: Job) -> None:
        await self.store.execute(
            f"INSERT OR REPLACE INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 17)})",
            job.row())
        if self.events is not None and job.status.terminal:
            await self.events.end(job_key(job.id), job.access_key, {
                "status": job.status.value, "exit_code": job.exit_code}, owner=job.id)

