"""Job sessions' and jobs' rows in the store. Every change is written here before it is reported."""

from __future__ import annotations

from .events import EventLog, job_key
from .jobs import JOB_COLUMNS, SESSION_COLUMNS, Job, JobSession
from .replicas import owned_by
from .store import Row, Store, columns, upsert

# A whole row, inserted or overwritten (the same statement in SQLite and PostgreSQL). The saver
# is the owner: the replica that holds the session in memory runs its jobs and timers.
SAVE_SESSION = upsert("job_sessions", [*columns(SESSION_COLUMNS), "owner"], ["id"])
SAVE_JOB = upsert("jobs", columns(JOB_COLUMNS), ["id"])


class JobRecords:
    def __init__(self, store: Store, events: EventLog | None = None) -> None:
        self.store = store
        self.events = events  # a job's event stream ends when its row says it ended
        self.owner: str | None = None  # this replica's id when replicas share the store

    async def save(self, js: JobSession) -> None:
        await self.store.execute(SAVE_SESSION, (*js.row(), self.owner))

    async def save_job(self, job: Job) -> None:
        await self.store.execute(SAVE_JOB, job.row())
        if self.events is not None and job.status.terminal:
            await self.events.end(job_key(job.id), job.access_key, {
                "status": job.status.value, "exit_code": job.exit_code}, owner=job.id)

    async def open_sessions(self) -> list[JobSession]:
        """Every job session not yet closed (with replicas: of this one), each with its next
        job number."""
        found = []
        mine, params = owned_by(self.owner)
        for row in await self.store.fetchall(
                f"SELECT {SESSION_COLUMNS} FROM job_sessions WHERE state != 'closed'{mine}",
                params):
            js = JobSession.from_row(row)
            js.next_seq = int((await self.store.fetchone(
                "SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM jobs WHERE session_id=?",
                (js.id,)) or {"n": 0})["n"])
            found.append(js)
        return found

    async def unfinished_jobs(self, js: JobSession) -> list[Job]:
        """The session's queued and running jobs, in order."""
        return [Job.from_row(r) for r in await self.store.fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE session_id=? AND status IN"
            " ('queued', 'running') ORDER BY seq", (js.id,))]

    async def session(self, access_key: str, ident: str) -> JobSession | None:
        row = await self.store.fetchone(
            f"SELECT {SESSION_COLUMNS} FROM job_sessions WHERE id=? AND access_key=?",
            (ident, access_key))
        return JobSession.from_row(row) if row is not None else None

    async def session_rows(self, access_key: str) -> list[Row]:
        return await self.store.fetchall(
            f"SELECT {SESSION_COLUMNS} FROM job_sessions WHERE access_key=?", (access_key,))

    async def job_rows(self, js: JobSession) -> list[Row]:
        return await self.store.fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE session_id=? AND access_key=? ORDER BY seq",
            (js.id, js.access_key))

    async def job(self, access_key: str, job_id: str) -> Job | None:
        row = await self.store.fetchone(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=? AND access_key=?", (job_id, access_key))
        return Job.from_row(row) if row is not None else None
