"""Job-session handlers (IBM Qiskit Runtime sessions, seed 004): create, list, info, update,
close; submit and read jobs. Routes exist under ``/api/v1`` and ``/v1``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from bridge.errors import InvalidRequest
from bridge.job_sessions import JobSessions
from bridge.jobs import Job, JobSession
from bridge.languages import resolve

from ..base import BaseHandler
from ..openapi import Operation
from .errors import IBM
from .models import (
    CreateJob,
    CreateSession,
    JobList,
    JobOut,
    Paging,
    SessionList,
    SessionOut,
    UpdateSession,
)

T = TypeVar("T")
PREFIX = r"(?:/api)?/v1"


class JobsHandler(BaseHandler):
    dialect = IBM

    @property
    def jobs(self) -> JobSessions:
        return self.bridge.jobs

    def session_out(self, js: JobSession) -> dict[str, Any]:
        return SessionOut.of(js, self.bridge.settings.server_name).model_dump()

    def paging_arg(self, name: str) -> int:
        raw = self.get_query_argument(name, "0")
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise InvalidRequest(f"{name} must be a non-negative integer, not {raw!r}.")
        return value

    def page(self, items: Sequence[T]) -> tuple[Sequence[T], Paging]:
        """Seed 002's paging: size 0 (or absent) returns everything; past the end, nothing."""
        size, index = self.paging_arg("size"), self.paging_arg("index")
        count = len(items)
        if size == 0:
            return items, Paging(pages=1 if count else 0, count=count)
        return items[index * size:(index + 1) * size], Paging(pages=math.ceil(count / size),
                                                             count=count)


class SessionsHandler(JobsHandler):
    admits = True

    async def post(self) -> None:
        """Open a session: 200 with the session. 400, 401, 429 (keypair's kernels in use)."""
        body = self.parse(CreateSession)
        js = await self.jobs.create(self.keypair.access_key, body.mode, body.language,
                                    max_ttl=body.max_ttl, interactive_ttl=body.interactive_ttl,
                                    environment=body.environment)
        self.send(self.session_out(js))

    async def get(self) -> None:
        """This keypair's sessions, newest first, paged by ``size`` and ``index``. 400, 401."""
        found = await self.jobs.all(self.keypair.access_key)
        items, paging = self.page(found)
        out = SessionList(sessions=[SessionOut.of(js, self.bridge.settings.server_name)
                                    for js in items], paging=paging)
        self.send(out.model_dump())


class SessionHandler(JobsHandler):
    owner_of = "job_session"

    async def get(self, ident: str) -> None:
        """One session (any dialect's). 401, 404."""
        self.send(self.session_out(await self.jobs.get(self.keypair.access_key, ident)))

    async def patch(self, ident: str) -> None:
        """``{"accepting_jobs": bool}``: 204. 400, 401, 404, 409."""
        body = self.parse(UpdateSession, self.json_object(allow_empty=False))
        js = await self.jobs.get(self.keypair.access_key, ident)
        await self.jobs.set_accepting(js, body.accepting_jobs)
        self.send(None, 204)


class CloseHandler(JobsHandler):
    owner_of = "job_session"

    async def delete(self, ident: str) -> None:
        """Cancel queued jobs, let running ones finish, then close: 204. 401, 404."""
        js = await self.jobs.get(self.keypair.access_key, ident)
        await self.jobs.close(js)
        self.send(None, 204)


class SessionJobsHandler(JobsHandler):
    owner_of = "job_session"
    admits = True

    async def post(self, ident: str) -> None:
        """Queue a job: 200 with the job (status queued or later). 400, 401, 404, 409."""
        body = self.parse(CreateJob, self.json_object(allow_empty=False))
        js = await self.jobs.get(self.keypair.access_key, ident)
        if body.language is not None and resolve(body.language).name != js.language:
            raise InvalidRequest(f"This session runs {js.language}, not {body.language!r}.")
        job = await self.jobs.submit(js, body.code, stdin=body.stdin, timeout=body.timeout,
                                     environment=body.environment)
        self.send(JobOut.of(job).model_dump())

    async def get(self, ident: str) -> None:
        """The session's jobs in submission order, paged. 400, 401, 404."""
        js = await self.jobs.get(self.keypair.access_key, ident)
        jobs: list[Job] = await self.jobs.jobs_of(js)
        items, paging = self.page(jobs)
        self.send(JobList(jobs=[JobOut.of(j) for j in items], paging=paging).model_dump())


class JobHandler(JobsHandler):
    owner_of = "job"

    async def get(self, job_id: str) -> None:
        """One job with its result fields. 401, 404."""
        self.send(JobOut.of(await self.jobs.get_job(self.keypair.access_key, job_id))
                  .model_dump())


_S = "/api/v1/sessions"
_E = (400, 401, 404, 409)
OPERATIONS = [
    Operation("POST", _S, "Open a job session (also /v1/sessions)", "jobs", CreateSession,
              SessionOut, 200, (400, 401, 429, 503)),
    Operation("GET", _S, "List sessions of every dialect, newest first", "jobs",
              response=SessionList, errors=(400, 401), query=("size", "index")),
    Operation("GET", _S + "/{id}", "A session (job session, Backend.AI or Sandbox)", "jobs",
              response=SessionOut, errors=(401, 404)),
    Operation("PATCH", _S + "/{id}", "Set accepting_jobs; false closes once jobs have run",
              "jobs", UpdateSession, status=204, errors=_E),
    Operation("DELETE", _S + "/{id}/close", "Cancel queued jobs and close after running ones",
              "jobs", status=204, errors=(401, 404)),
    Operation("POST", _S + "/{id}/jobs", "Queue a job in the session", "jobs", CreateJob, JobOut,
              200, _E),
    Operation("GET", _S + "/{id}/jobs", "The session's jobs in submission order", "jobs",
              response=JobList, errors=(400, 401, 404), query=("size", "index")),
    Operation("GET", "/api/v1/jobs/{job_id}", "A job and its result", "jobs", response=JobOut,
              errors=(401, 404)),
]


def routes() -> list[tuple[str, type[BaseHandler]]]:
    return [
        (PREFIX + r"/sessions/?", SessionsHandler),
        (PREFIX + r"/sessions/([^/]+)/close", CloseHandler),
        (PREFIX + r"/sessions/([^/]+)/jobs", SessionJobsHandler),
        (PREFIX + r"/sessions/([^/]+)", SessionHandler),
        (PREFIX + r"/jobs/([^/]+)", JobHandler),
    ]
