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
AT = "2026-12-01T00:00:00Z"  # an example timestamp


class Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class CreateSession(Strict):
    mode: Literal["batch", "dedicated"] = Field(
        default="dedicated", description="dedicated: one kernel, jobs in order, state kept; "
                                         "batch: jobs in parallel, each on a fresh kernel",
        examples=["dedicated"])
    max_ttl: StrictInt = Field(default=DEFAULT_MAX_TTL, ge=1, le=MAX_INT32,
                               description="seconds from the first job's start to closing",
                               examples=[3600])
    interactive_ttl: StrictInt | None = Field(
        default=None, ge=1, le=MAX_INT32, description="seconds without a job before the "
        "session goes inactive (default 60 dedicated, 1 batch)", examples=[60])
    language: StrictStr = Field(default="python", description="Language of the session's "
                                "kernels.", examples=["python"])
    environment: dict[StrictStr, StrictStr] | None = Field(
        default=None, description="environment variables of a dedicated session's kernel",
        examples=[{"MODE": "test"}])
    # IBM clients name their backend and instance; this server is the only backend there is.
    backend: StrictStr | None = Field(default=None, description="Accepted and ignored: this "
                                      "server is the backend.", examples=[None])
    backend_name: StrictStr | None = Field(default=None, description="Accepted and ignored.",
                                           examples=[None])
    instance: StrictStr | None = Field(default=None, description="Accepted and ignored.",
                                       examples=[None])


class UpdateSession(Strict):
    accepting_jobs: StrictBool = Field(description="false: the session closes once its queue "
                                       "drains.", examples=[False])


class CreateJob(Strict):
    code: StrictStr = Field(description="The program to run.", examples=["print(6 * 7)"])
    stdin: StrictStr | None = Field(default=None, description="Input for the program.",
                                    examples=["3\n"])
    environment: dict[StrictStr, StrictStr] | None = Field(
        default=None, description="Environment variables for this job.",
        examples=[{"GREETING": "hi"}])
    timeout: StrictInt | StrictFloat = Field(default=DEFAULT_JOB_TIMEOUT, gt=0,
                                             le=MAX_JOB_TIMEOUT, description="Seconds before "
                                             "the job is stopped and fails.", examples=[30])
    language: StrictStr | None = Field(default=None, description="if given, the session's "
                                       "language", examples=["python"])


class Transition(BaseModel):
    status: str = Field(description="The state entered.", examples=["active"])
    timestamp: str = Field(description="When (ISO 8601, UTC).",
                           examples=[AT])


class SessionOut(BaseModel):
    id: str = Field(description="The session's id.",
                    examples=["3f2b8c1e-0d4a-4e5b-9c6d-7e8f9a0b1c2d"])
    backend_name: str = Field(description="This server's name (KB_SERVER_NAME).",
                              examples=["kernel-bridge"])
    started_at: str | None = Field(description="Created.", examples=[AT])
    activated_at: str | None = Field(description="First job started.", examples=[AT])
    closed_at: str | None = Field(description="Closed.", examples=[None])
    last_job_started: str | None = Field(description="Last job started.", examples=[AT])
    last_job_completed: str | None = Field(description="Last job ended.", examples=[AT])
    interactive_ttl: int | None = Field(description="Seconds without a job before inactive.",
                                        examples=[60])
    max_ttl: int | None = Field(description="Seconds from activation to closing.",
                                examples=[28800])
    active_ttl: int | None = Field(description="Seconds left before max_ttl closes it.",
                                   examples=[28000])
    state: Literal["open", "active", "inactive", "closed"] = Field(
        description="open → active ⇄ inactive → closed.", examples=["active"])
    state_reason: str = Field(description="Why it is in this state.", examples=[""])
    accepting_jobs: bool = Field(description="Takes new jobs.", examples=[True])
    mode: Literal["batch", "dedicated"] = Field(description="batch or dedicated.",
                                                examples=["dedicated"])
    timestamps: list[Transition] = Field(description="Every state transition.")
    user_id: str = Field(description="The owning keypair's access key.",
                         examples=["AKIA0123456789ABCDEF"])
    elapsed_time: float | None = Field(description="Seconds spent running jobs.",
                                       examples=[1.5])

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
    id: str = Field(description="The job's id.", examples=["9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"])
    execution_id: str = Field(description="The same id, as the Sandbox dialect names it.",
                              examples=["9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"])
    session_id: str = Field(description="Its session's id.",
                            examples=["3f2b8c1e-0d4a-4e5b-9c6d-7e8f9a0b1c2d"])
    status: Literal["queued", "running", "completed", "failed", "cancelled"] = Field(
        description="queued, running, completed, failed or cancelled.", examples=["completed"])
    stdout: str = Field(description="Output so far.", examples=["42\n"])
    stderr: str = Field(description="Errors so far.", examples=[""])
    exit_code: int | None = Field(description="Once ended; -1 if it failed or timed out.",
                                  examples=[0])
    execution_time: float | None = Field(description="Seconds it ran.", examples=[0.02])
    language: str = Field(description="Language.", examples=["python"])
    timeout: float = Field(description="Seconds allowed.", examples=[30])
    created_at: str | None = Field(description="Submitted.", examples=[AT])
    started_at: str | None = Field(description="Started.", examples=[AT])
    completed_at: str | None = Field(description="Ended.", examples=[AT])

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(id=job.id, execution_id=job.id, session_id=job.session_id,
                   status=job.status.value,
                   stdout=job.live_output("stdout"), stderr=job.live_output("stderr"),
                   exit_code=job.exit_code, execution_time=job.execution_time,
                   language=job.language, timeout=job.timeout, created_at=iso(job.created_at),
                   started_at=iso(job.started_at), completed_at=iso(job.completed_at))


class Paging(BaseModel):
    pages: int = Field(description="Pages at this size.", examples=[1])
    count: int = Field(description="Items in all.", examples=[3])


class SessionList(BaseModel):
    sessions: list[SessionOut] = Field(description="This page's sessions.")
    paging: Paging = Field(description="Page count and total.")


class JobList(BaseModel):
    jobs: list[JobOut] = Field(description="This page's jobs.")
    paging: Paging = Field(description="Page count and total.")
