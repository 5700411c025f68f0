"""Runs job sessions' jobs, each on a bridge session (:mod:`bridge.sessions`).

dedicated: one bridge session (one kernel, its state kept) runs the session's jobs one at a
time, in order. batch: each job gets a fresh ephemeral bridge session, destroyed when the job
ends; jobs of all the keypair's batch sessions run in parallel up to the keypair's concurrency,
oldest first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping

from .admission import Ticket
from .errors import BridgeError
from .events import EventLog, job_key
from .job_records import JobRecords
from .jobs import EXIT_RULE, Job, JobSession, JobStatus, State
from .keypairs import Keypairs
from .languages import resolve
from .outcomes import FAILED_EXIT_CODE
from .session import Limits, Session
from .sessions import Sessions
from .settings import Settings
from .tasks import spawn

log = logging.getLogger(__name__)

ORIGIN = "jobs"  # the origin of the bridge sessions that run jobs


class JobWorker:
    """``live``: the registry's open job sessions; ``jobs``: its queued and running jobs (a
    job leaves it as it ends). ``after_job`` is told of every job's end, once recorded (the
    registry closes a session with nothing left to do); ``wake`` that a deadline changed."""

    def __init__(self, settings: Settings, keypairs: Keypairs, sessions: Sessions,
                 records: JobRecords, live: Mapping[str, JobSession], jobs: dict[str, Job], *,
                 events: EventLog | None, ttl_slack: float,
                 after_job: Callable[[JobSession], Awaitable[None]],
                 wake: Callable[[], None]) -> None:
        self.settings = settings
        self.keypairs = keypairs
        self.sessions = sessions
        self.records = records
        self.events = events
        self._live = live
        self._jobs = jobs
        self._ttl_slack = ttl_slack
        self._after_job = after_job
        self._wake = wake
        self._batch_running: dict[str, int] = defaultdict(int)  # per access key
        self._paused = False  # draining for a stop: queued jobs wait for the next server

    def pause(self) -> None:
        """Start no more queued jobs (a graceful stop): running ones finish, queued ones stay
        queued in the store for the next server."""
        self._paused = True

    @property
    def jobs_running(self) -> int:
        return sum(len(js.running) for js in self._live.values())

    async def stop(self) -> None:
        """Stop every job; jobs cut short are recorded as failed (their kernels go too)."""
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
                await self.records.save_job(job)
            await self.records.save(js)

    def pump(self, js: JobSession) -> None:
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
        log.info("job %s of session %s starts", job.id, js.id)
        now = time.time()
        job.status, job.started_at = JobStatus.RUNNING, now
        js.job_started(job, now)
        self._wake()
        task = spawn(self._run(js, job))
        js.tasks.add(task)
        task.add_done_callback(js.tasks.discard)

    async def _run(self, js: JobSession, job: Job) -> None:
        await self.records.save(js)
        await self.records.save_job(job)
        session: Session | None = None
        try:
            session, timeout = await self._session_for(js, job)
            run = self.sessions.query(session, job.code, timeout=timeout, stdin=job.stdin or "",
                                      rule=EXIT_RULE)
            job.run = run
            if self.events is not None:
                self.events.follow(run, job_key(job.id), job.access_key, owner=job.id,
                                   ends_with_run=False)
            await self.sessions.submit(session, run)
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
        await self.records.save_job(job)
        await self.records.save(js)
        await self._after_job(js)
        self._wake()
        if js.mode == "batch":
            try:
                if session is not None:
                    await self.sessions.discard(session, "job finished")
            finally:
                # The slot is free once the job's kernel is gone, not before.
                self._batch_running[js.access_key] -= 1
        self.pump(js)

    async def _session_for(self, js: JobSession, job: Job) -> tuple[Session, float]:
        """The bridge session ``job`` runs on, and what is left of its timeout."""
        if js.mode == "dedicated":
            if js.session is None or not js.session.alive:
                js.session = await self.new_session(js, js.id, js.environment)
            elif await js.session.kernel_dead():
                # An earlier job killed it. Asked directly: the bridge may not have marked
                # the session ERROR yet when the next job starts.
                await self.sessions.restart(js.session)
            return js.session, job.timeout
        # A batch job's kernel takes one of the keypair's places like any other; it waits for
        # one within the job's timeout, which then covers the run too.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.timeout
        ticket = self.sessions.reserve(js.access_key, (job.id, job.id, "job"), self.limits(js),
                                       wait=True)
        await self.sessions.admission.wait(ticket, deadline)
        timeout = max(deadline - loop.time(), 0.001)  # what the wait left
        return await self.new_session(js, job.id, job.environment, ticket), timeout

    def limits(self, js: JobSession) -> Limits:
        # The job session's own timers end it; the bridge's idle reaper must not come first.
        return Limits(query_timeout_ms=0, max_cpu_credit_ms=0,
                      mem_kib=self.settings.default_mem_kib,
                      idle_timeout_s=float((js.max_ttl or 0) + self._ttl_slack + 60))

    async def new_session(self, js: JobSession, name: str, environ: dict[str, str],
                          ticket: Ticket | None = None) -> Session:
        """A bridge session admitted now (a dedicated session's: a refusal is the caller's
        429) or by ``ticket`` (a batch job's, granted after waiting)."""
        return await self.sessions.create(
            js.access_key, resolve(js.language), name=name, origin=ORIGIN,
            limits=self.limits(js), environ=environ, ticket=ticket,
            # dedicated: a timed-out job restarts the kernel and the session goes on;
            # batch: the job's kernel is thrown away anyway.
            on_timeout="restart" if js.mode == "dedicated" else "destroy")
