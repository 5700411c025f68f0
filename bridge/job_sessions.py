"""The job-session registry: the API's job sessions and their jobs, live and recorded.

Around it: :mod:`bridge.job_worker` runs the jobs (on bridge sessions), :mod:`bridge.job_reaper`
fires the timers, :mod:`bridge.job_records` writes every change to the store before it is
reported. On start-up the records are reloaded: deadlines that passed while the server was down
fire with their own timestamps, jobs that were running are failed (their results went with the
server), and queued jobs run. A dedicated session's kernel is re-adopted with its state
(bridge/adoption.py) and its queued jobs run on it, in order; when its kernel is gone, its record
stays as it was (state, timers, timestamps) with a note in state_reason, and its next job starts
a fresh kernel.
"""

from __future__ import annotations

import logging
import time

from .errors import Conflict, InvalidRequest, JobNotFound, SessionNotFound
from .events import EventLog
from .job_reaper import JobReaper
from .job_records import JobRecords
from .job_worker import ORIGIN, JobWorker
from .jobs import (
    DEFAULT_INTERACTIVE_TTL,
    OPEN_TTL,
    Job,
    JobSession,
    JobStatus,
    State,
    iso,
    view_of,
)
from .keypairs import Keypairs
from .languages import require_available, resolve
from .outcomes import FAILED_EXIT_CODE
from .session import Session
from .sessions import Sessions
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


class JobSessions:
    def __init__(self, settings: Settings, store: Store, keypairs: Keypairs,
                 sessions: Sessions, open_ttl: float = OPEN_TTL,
                 events: EventLog | None = None) -> None:
        self.sessions = sessions
        self.keypairs = keypairs
        self.open_ttl = open_ttl
        self.records = JobRecords(store, events)  # events: each job's stream (bridge.events)
        self._live: dict[str, JobSession] = {}  # not yet closed
        self._jobs: dict[str, Job] = {}  # queued or running
        self.reaper = JobReaper(self._live, self._wind_down, self.records.save, open_ttl)
        self.worker = JobWorker(settings, keypairs, sessions, self.records, self._live,
                                self._jobs, events=events, ttl_slack=open_ttl,
                                after_job=self._maybe_close, wake=self.reaper.wake)

    # -- start / stop -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.adopt()
        self.reaper.start()

    async def adopt(self) -> None:
        """Take up the open job sessions recorded as this server's that it does not run yet:
        at start, and (with replicas) those just claimed from a replica that died. Queued jobs
        queue again; running ones failed with the kernel they ran in."""
        now = time.time()
        adopted: list[JobSession] = []
        for js in await self.records.open_sessions():
            if js.id in self._live:
                continue
            adopted.append(js)
            for job in await self.records.unfinished_jobs(js):
                if job.status is JobStatus.RUNNING:
                    job.end(JobStatus.FAILED, FAILED_EXIT_CODE, stdout=job.stdout,
                            stderr="The server restarted while this job ran: its output and "
                                   "exit code are lost (a kernel the new server re-adopted "
                                   "went on running it).\n", at=now)
                    await self.records.save_job(job)
                else:
                    js.queue.append(job)
                    self._jobs[job.id] = job
            if js.state is State.ACTIVE and not js.has_work and js.idle_deadline is None:
                js.idle_deadline = now + (js.interactive_ttl or 0)
            if js.mode == "dedicated":
                # Its kernel, re-adopted by the registry (bridge/adoption.py), state intact.
                js.session = self.sessions.find(js.access_key, js.id)
            self._live[js.id] = js
            await self.records.save(js)
        # Kernels of jobs that ended with the old server (a batch job's, a closed session's).
        owned = {js.session for js in self._live.values()}
        for orphan in [s for s in self.sessions.all() if s.origin == ORIGIN and s not in owned]:
            await self.sessions.discard(orphan, "its job ended with the server")
        # Deadlines that passed while the server was down fire now, stamped with their own time.
        await self.reaper.fire_due(now)
        for js in adopted:
            await self._maybe_close(js)
            if js.state is not State.CLOSED and js.session is None and js.activated_at \
                    and js.mode == "dedicated":
                # Noted after the deadlines fired, so the note is the last word until the
                # session's next transition.
                js.state_reason += (f"; the server restarted at {iso(now)}: the kernel and its "
                                    "state are gone, the next job starts a fresh kernel")
                await self.records.save(js)
            self.worker.pump(js)

    def pause(self) -> None:
        """A graceful stop: no more queued jobs start (they wait for the next server)."""
        self.worker.pause()

    @property
    def jobs_running(self) -> int:
        return self.worker.jobs_running

    async def stop(self) -> None:
        """Stop timers and jobs; jobs cut short are recorded as failed (their kernels go too)."""
        await self.reaper.stop()
        await self.worker.stop()

    # -- queries ------------------------------------------------------------------------------

    async def get(self, access_key: str, ident: str) -> JobSession:
        """A job session of this keypair, or another dialect's live session seen as one.

        Raises SessionNotFound.
        """
        js = self._live.get(ident)
        if js is not None and js.access_key == access_key:
            return js
        recorded = await self.records.session(access_key, ident)
        if recorded is not None:
            return recorded
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
        rows = await self.records.session_rows(access_key)
        found = [self._live.get(r["id"]) or JobSession.from_row(r) for r in rows]
        found += [view_of(s) for s in self.sessions.all(access_key) if self._shown(s)]
        return sorted(found, key=lambda js: js.started_at, reverse=True)

    async def jobs_of(self, js: JobSession) -> list[Job]:
        rows = await self.records.job_rows(js)
        return [self._jobs.get(r["id"]) or Job.from_row(r) for r in rows]

    async def get_job(self, access_key: str, job_id: str) -> Job:
        """Raises JobNotFound."""
        job = self._jobs.get(job_id)
        if job is not None and job.access_key == access_key:
            return job
        recorded = await self.records.job(access_key, job_id)
        if recorded is None:
            raise JobNotFound(job_id)
        return recorded

    # -- commands -----------------------------------------------------------------------------

    async def create(self, access_key: str, mode: str, language: str, *, max_ttl: int,
                     interactive_ttl: int | None = None,
                     environment: dict[str, str] | None = None) -> JobSession:
        """Open a job session; a dedicated one starts its kernel now.

        Raises InvalidRequest (unknown or unavailable language), QuotaExceeded,
        KernelStartFailed.
        """
        lang = require_available(resolve(language))
        if mode not in DEFAULT_INTERACTIVE_TTL:
            raise InvalidRequest(f"mode must be 'batch' or 'dedicated', not {mode!r}.")
        ittl = interactive_ttl if interactive_ttl is not None else min(
            DEFAULT_INTERACTIVE_TTL[mode], max_ttl)
        if ittl > max_ttl:
            raise InvalidRequest(f"interactive_ttl ({ittl}) must not exceed max_ttl ({max_ttl}).")
        js = JobSession(id=Job.new_id(), access_key=access_key, mode=mode, language=lang.name,
                        max_ttl=max_ttl, interactive_ttl=ittl, environment=dict(environment or {}))
        if mode == "dedicated":
            js.session = await self.worker.new_session(js, js.id, js.environment)
        # The open TTL counts from when the session can take a job: a dedicated session's
        # kernel may take seconds to start on a loaded machine, and that wait is not the
        # client's idleness (the bridge's idle reaper counts from kernel ready too).
        js.open_deadline = time.time() + self.open_ttl
        try:
            await self.records.save(js)
        except BaseException:
            if js.session is not None:
                await self.sessions.discard(js.session, "job session not recorded")
            raise
        self._live[js.id] = js
        self.reaper.wake()
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
        await self.records.save_job(job)
        js.next_seq += 1
        js.queue.append(job)
        self._jobs[job.id] = job
        js.idle_deadline = None  # work is waiting: the interactive TTL does not run
        await self.keypairs.count_query(js.access_key)
        self.worker.pump(js)
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
        await self.records.save(js)
        await self._maybe_close(js)
        self.reaper.wake()

    async def close(self, js: JobSession, reason: str = "closed by request") -> None:
        """DELETE …/close: cancel queued jobs, stop accepting, close once running jobs end."""
        if js.origin != ORIGIN:
            s = self._foreign(js.access_key, js.id)
            if s is not None:
                await self.sessions.discard(s, "closed through the job-sessions API")
            return
        if js.state is State.CLOSED or js.id not in self._live:
            return
        await self._wind_down(js, reason)

    # -- closing -------------------------------------------------------------------

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
            await self.records.save_job(job)
        await self.records.save(js)
        await self._maybe_close(js, at)

    async def _maybe_close(self, js: JobSession, at: float | None = None) -> None:
        if js.state is State.CLOSED or js.accepting_jobs or js.has_work:
            return
        js.transition(State.CLOSED, js.close_reason or "closed", at)
        log.info("job session %s closed: %s", js.id, js.state_reason)
        self._live.pop(js.id, None)
        await self.records.save(js)
        if js.session is not None:
            session, js.session = js.session, None
            await self.sessions.discard(session, "job session closed")
