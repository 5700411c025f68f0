"""Bodies of the job-sessions dialect: requests as IBM's clients send them, responses with every
field of seed 004's session object and the Sandbox result fields for jobs."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from bridge.jobs import (
    DEFAULT_JOB_TIMEOUT,
    DEFAULT_MAX_TTL,
    MAX_JOB_TIMEOUT,
    Job,
    JobSession,
    iso,
)

MAX_INT32 = 2**31 - 1


class Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class CreateSession(Strict):
    mode: Literal["batch", "dedicated"] = Field(
        "dedicated", description="dedicated: one kernel, jobs in order, state kept; batch: "
                                 "jobs in parallel, each on a fresh kernel")
    max_ttl: StrictInt = Field(DEFAULT_MAX_TTL, ge=1, le=MAX_INT32,
                               description="seconds from the first job's start to closing")
    interactive_ttl: StrictInt | None = Field(
        None, ge=1, le=MAX_INT32, description="seconds without a job before the session goes "
                                              "inactive (default 60 dedicated, 1 batch)")
    language: StrictStr = "python"
    environment: dict[StrictStr, StrictStr] | None = Field(
        None, description="environment variables of a dedicated session's kernel")
    # IBM clients name their backend and instance; this server is the only backend there is.
    backend: StrictStr | None = None
    backend_name: StrictStr | None = None
    instance: StrictStr | None = None


class UpdateSession(Strict):
    accepting_jobs: StrictBool


class CreateJob(Strict):
    code: StrictStr
    stdin: StrictStr | None = None
    environment: dict[StrictStr, StrictStr] | None = None
    timeout: StrictInt | StrictFloat = Field(DEFAULT_JOB_TIMEOUT, gt=0, le=MAX_JOB_TIMEOUT)
    language: StrictStr | None = Field(None, description="if given, the session's language")


class Transition(BaseModel):
    status: str
    timestamp: str


class SessionOut(BaseModel):
    id: str
    backend_name: str
    started_at: str | None
    activated_at: str | None
    closed_at: str | None
    last_job_started: str | None
    last_job_completed: str | None
    interactive_ttl: int | None
    max_ttl: int | None
    active_ttl: int | None
    state: Literal["open", "active", "inactive", "closed"]
    state_reason: str
    accepting_jobs: bool
    mode: Literal["batch", "dedicated"]
    timestamps: list[Transition]
    user_id: str
    elapsed_time: float | None

    @classmethod
    def of(cls, js: JobSession, backend_name: str) -> SessionOut:
        now = time.time()
        return cls(
            id=js.id, backend_name=backend_name, started_at=iso(js.started_at),
            activated_at=iso(js.activated_at), closed_at=iso(js.closed_at),
            last_job_started=iso(js.last_job_started),
            last_job_completed=iso(js.last_job_completed),
            interactive_ttl=js.interactive_ttl, max_ttl=js.max_ttl,
            active_ttl=js.active_ttl(now), state=js.state.value,
            state_reason=js.state_reason, accepting_jobs=js.accepting_jobs,
            mode=js.mode,  # type: ignore[arg-type]
            timestamps=[Transition(status=s, timestamp=iso(t) or "") for s, t in js.timestamps],
            user_id=js.access_key, elapsed_time=js.elapsed_time(now))


class JobOut(BaseModel):
    id: str
    execution_id: str
    session_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    stdout: str
    stderr: str
    exit_code: int | None
    execution_time: float | None
    language: str
    timeout: float
    created_at: str | None
    started_at: str | None
    completed_at: str | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(id=job.id, execution_id=job.id, session_id=job.session_id,
                   status=job.status.value,
                   stdout=job.live_output("stdout"), stderr=job.live_output("stderr"),
                   exit_code=job.exit_code, execution_time=job.execution_time,
                   language=job.language, timeout=job.timeout, created_at=iso(job.created_at),
                   started_at=iso(job.started_at), completed_at=iso(job.completed_at))


class Paging(BaseModel):
    pages: int
    count: int


class SessionList(BaseModel):
    sessions: list[SessionOut]
    paging: Paging


class JobList(BaseModel):
    jobs: list[JobOut]
    paging: Paging
