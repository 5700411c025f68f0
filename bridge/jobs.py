"""Job sessions (IBM Qiskit Runtime style): the model, its state machine, jobs, and their rows.

A job session groups jobs under two clocks. ``max_ttl`` starts when the first job starts and
never pauses; ``interactive_ttl`` starts each time the session runs out of work.

    OPEN ──first job starts──▶ ACTIVE ──interactive_ttl passes, nothing to run──▶ INACTIVE
      │                        ▲  │                                                  │
      │                        │  └───────────────────────────┐                      │
      │                        └──────────── a job starts ────┼──────────────────────┘
      │                                                       ▼
      └─────────────────────────────────────────────────▶ CLOSED
          max_ttl reached · DELETE …/close · accepting_jobs=false and the queue drained ·
          no job at all within OPEN_TTL

Closing never kills a running job: queued jobs are cancelled at once, the session stops
accepting jobs, and CLOSED is entered when the last running job ends. Every deadline is a wall
clock time stored in SQLite, so the reaper (bridge.job_sessions) reloads it after a restart.
The manager that runs jobs and fires deadlines is :mod:`bridge.job_sessions`.
"""

from __future__ import annotations

import enum
import json
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import InvalidTransition
from .outcomes import FAILED_EXIT_CODE as FAILED_EXIT_CODE  # the one -1, importable here too
from .outcomes import ExitRule, RunState, exit_code, failed_stderr
from .runs import Run

if TYPE_CHECKING:
    import asyncio

    from .session import Session

# IBM's defaults: max_ttl 8 h; interactive TTL 60 s for a dedicated session, 1 s for a batch.
DEFAULT_MAX_TTL = 28_800
DEFAULT_INTERACTIVE_TTL = {"dedicated": 60, "batch": 1}
# "If you open a session but do not submit any jobs to it for 30 minutes, the session
# automatically closes" (IBM); otherwise a forgotten open dedicated session holds a kernel forever.
OPEN_TTL = 1_800
DEFAULT_JOB_TIMEOUT = 30  # seconds, as the Sandbox dialect
MAX_JOB_TIMEOUT = 300
EXIT_RULE = ExitRule.PROGRAM  # a job's exit code is its program's, as a one-shot's


def iso(t: float | None) -> str | None:
    """An epoch time as IBM writes it: ``2025-01-31T12:00:00.123Z``."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class State(enum.Enum):
    OPEN = "open"
    ACTIVE = "active"
    INACTIVE = "inactive"
    CLOSED = "closed"


_ALLOWED: dict[State, frozenset[State]] = {
    State.OPEN: frozenset({State.ACTIVE, State.CLOSED}),
    State.ACTIVE: frozenset({State.INACTIVE, State.CLOSED}),
    State.INACTIVE: frozenset({State.ACTIVE, State.CLOSED}),
    State.CLOSED: frozenset(),
}


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"  # the program ran to its end (its exit code may still say error)
    FAILED = "failed"  # timed out, kernel died or could not start; exit code -1
    CANCELLED = "cancelled"  # never started: its session was closed first

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(eq=False)
class Job:
    id: str
    session_id: str
    access_key: str
    seq: int
    code: str
    language: str
    timeout: float
    stdin: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    status: JobStatus = JobStatus.QUEUED
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    execution_time: float | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None

    def __post_init__(self) -> None:
        self.run: Run | None = None  # while running: its live output

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def live_output(self, stream: str) -> str:
        if self.run is not None and not self.status.terminal:
            return self.run.text(stream)
        return self.stdout if stream == "stdout" else self.stderr

    def end(self, status: JobStatus, exit_code: int, *, stdout: str = "", stderr: str = "",
            at: float | None = None) -> None:
        """Enter a terminal status. Raises InvalidTransition if already ended."""
        if self.status.terminal:
            raise InvalidTransition(f"job {self.id}", "queued or running", self.status.value)
        self.status = status
        self.exit_code = exit_code
        self.stdout, self.stderr = stdout, stderr
        self.completed_at = at or time.time()
        if self.started_at is not None:
            self.execution_time = round(self.completed_at - self.started_at, 4)
        self.run = None

    def record(self, run: Run) -> None:
        """End with the result of the run that executed it (bridge.outcomes decides)."""
        stdout, at = run.text("stdout"), run.finished_at
        if run.state is RunState.FINISHED:
            self.end(JobStatus.COMPLETED, exit_code(run), stdout=stdout,
                     stderr=run.text("stderr"), at=at)
        else:
            self.end(JobStatus.FAILED, exit_code(run), stdout=stdout,
                     stderr=failed_stderr(run, self.timeout), at=at)
        if run.started_at is not None and run.finished_at is not None:
            # The code's own run time, as the Sandbox dialect reports it: no kernel start-up.
            self.execution_time = round(run.finished_at - run.started_at, 4)

    def row(self) -> tuple[Any, ...]:
        return (self.id, self.session_id, self.access_key, self.seq, self.code, self.stdin,
                json.dumps(self.environment), self.timeout, self.language, self.status.value,
                self.stdout, self.stderr, self.exit_code, self.execution_time, self.created_at,
                self.started_at, self.completed_at)

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> Job:
        return cls(id=r["id"], session_id=r["session_id"], access_key=r["access_key"],
                   seq=r["seq"], code=r["code"], language=r["language"], timeout=r["timeout"],
                   stdin=r["stdin"], environment=json.loads(r["environment"]),
                   status=JobStatus(r["status"]), stdout=r["stdout"], stderr=r["stderr"],
                   exit_code=r["exit_code"], execution_time=r["execution_time"],
                   created_at=r["created_at"], started_at=r["started_at"],
                   completed_at=r["completed_at"])


JOB_COLUMNS = ("id, session_id, access_key, seq, code, stdin, environment, timeout, language,"
               " status, stdout, stderr, exit_code, execution_time, created_at, started_at,"
               " completed_at")


@dataclass(eq=False)
class JobSession:
    """One job session. Times are epoch seconds; deadlines are what the reaper waits for."""

    id: str
    access_key: str
    mode: str  # "dedicated" | "batch"
    language: str
    max_ttl: int | None
    interactive_ttl: int | None
    environment: dict[str, str] = field(default_factory=dict)
    state: State = State.OPEN
    state_reason: str = "created; waiting for its first job"
    accepting_jobs: bool = True
    close_reason: str | None = None  # the reason CLOSED will carry once running jobs end
    started_at: float = field(default_factory=time.time)
    activated_at: float | None = None
    closed_at: float | None = None
    last_job_started: float | None = None
    last_job_completed: float | None = None
    timestamps: list[tuple[str, float]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds with at least one job running, up to busy_since
    max_deadline: float | None = None
    idle_deadline: float | None = None
    open_deadline: float | None = None
    origin: str = "jobs"  # another dialect's session seen through this one: "backendai", …

    def __post_init__(self) -> None:
        if not self.timestamps:
            self.timestamps.append((self.state.value, self.started_at))
        self.queue: deque[Job] = deque()
        self.running: set[Job] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy_since: float | None = None
        self.session: Session | None = None  # dedicated: the bridge session that keeps state
        self.next_seq = 0

    # -- the state machine ----------------------------------------------------------------------

    def transition(self, to: State, reason: str, at: float | None = None) -> None:
        """Move to ``to``, recording when and why. Raises InvalidTransition."""
        if to not in _ALLOWED[self.state]:
            allowed = "/".join(sorted(s.value for s in _ALLOWED[self.state])) or "none"
            raise InvalidTransition(f"job session {self.id}", allowed, f"{self.state.value}→"
                                    f"{to.value}")
        at = at if at is not None else time.time()
        self.state, self.state_reason = to, reason
        self.timestamps.append((to.value, at))
        if to is State.ACTIVE and self.activated_at is None:
            self.activated_at = at
            if self.max_ttl is not None:
                # IBM: the max TTL timer starts with the first job and never pauses.
                self.max_deadline = at + self.max_ttl
            self.open_deadline = None
        if to is State.CLOSED:
            self.closed_at = at
            self.accepting_jobs = False
            self.max_deadline = self.idle_deadline = self.open_deadline = None
        if to is not State.ACTIVE:
            self.idle_deadline = None

    @property
    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    @property
    def expired(self) -> bool:
        """max_ttl has passed: nothing new may start, whatever accepting_jobs says."""
        return self.close_reason is not None and self.close_reason.startswith("max_ttl")

    def job_started(self, job: Job, at: float) -> None:
        if not self.running:
            self.busy_since = at
        self.running.add(job)
        self.last_job_started = at
        self.idle_deadline = None
        if self.state in (State.OPEN, State.INACTIVE):
            why = "first job started" if self.state is State.OPEN else "a new job started"
            self.transition(State.ACTIVE, why, at)

    def job_ended(self, job: Job, at: float) -> None:
        self.running.discard(job)
        if job.started_at is not None:
            self.last_job_completed = at
        if not self.running and self.busy_since is not None:
            self.elapsed += at - self.busy_since
            self.busy_since = None
        if (self.state is State.ACTIVE and not self.has_work and self.interactive_ttl
                and self.accepting_jobs):
            # IBM: the interactive TTL timer starts after each job completes.
            self.idle_deadline = at + self.interactive_ttl

    # -- computed fields --------------------------------------------------------------------------

    def elapsed_time(self, now: float | None = None) -> float:
        """Seconds during which at least one of its jobs was running."""
        now = now or time.time()
        busy = now - self.busy_since if self.busy_since is not None else 0.0
        return round(self.elapsed + busy, 3)

    def active_ttl(self, now: float | None = None) -> int | None:
        """Seconds left before max_ttl ends the session; the full max_ttl until activation."""
        if self.max_ttl is None:
            return None
        if self.state is State.CLOSED:
            return 0
        if self.max_deadline is None:
            return self.max_ttl
        return max(0, math.ceil(self.max_deadline - (now or time.time())))

    def next_deadline(self) -> float | None:
        times = [t for t in (self.max_deadline, self.idle_deadline, self.open_deadline)
                 if t is not None]
        return min(times) if times else None

    # -- rows -------------------------------------------------------------------------------------

    def row(self) -> tuple[Any, ...]:
        return (self.id, self.access_key, self.mode, self.language, json.dumps(self.environment),
                self.max_ttl, self.interactive_ttl, self.state.value, self.state_reason,
                int(self.accepting_jobs), self.close_reason, self.started_at, self.activated_at,
                self.closed_at, self.last_job_started, self.last_job_completed,
                json.dumps(self.timestamps), self.elapsed, self.max_deadline, self.idle_deadline,
                self.open_deadline)

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> JobSession:
        return cls(id=r["id"], access_key=r["access_key"], mode=r["mode"],
                   language=r["language"], environment=json.loads(r["environment"]),
                   max_ttl=r["max_ttl"], interactive_ttl=r["interactive_ttl"],
                   state=State(r["state"]), state_reason=r["state_reason"],
                   accepting_jobs=bool(r["accepting_jobs"]), close_reason=r["close_reason"],
                   started_at=r["started_at"], activated_at=r["activated_at"],
                   closed_at=r["closed_at"], last_job_started=r["last_job_started"],
                   last_job_completed=r["last_job_completed"],
                   timestamps=[(s, t) for s, t in json.loads(r["timestamps"])],
                   elapsed=r["elapsed"], max_deadline=r["max_deadline"],
                   idle_deadline=r["idle_deadline"], open_deadline=r["open_deadline"])


SESSION_COLUMNS = ("id, access_key, mode, language, environment, max_ttl, interactive_ttl, state,"
                   " state_reason, accepting_jobs, close_reason, started_at, activated_at,"
                   " closed_at, last_job_started, last_job_completed, timestamps, elapsed,"
                   " max_deadline, idle_deadline, open_deadline")


def view_of(s: Session, interactive_ttl: int = DEFAULT_INTERACTIVE_TTL["dedicated"]) -> JobSession:
    """Another dialect's session (a Backend.AI kernel, a Sandbox session_id) as a job session.

    Such a session is one kernel with state, so its mode is dedicated. It has no max_ttl (its own
    idle timeout ends it), so max_ttl and active_ttl are null. Its state follows its activity:
    open until its first run, active while a run is queued or running and for interactive_ttl
    after the last one, inactive after that. Only live sessions have a view: once ended they
    belong to their own dialect's records.
    """
    mono_now, now = time.monotonic(), time.time()
    started = datetime.fromisoformat(s.created_at).timestamp()
    runs = s.started_runs()
    first = min((r.started_at for r in runs if r.started_at is not None), default=None)
    last_start = max((r.started_at for r in runs if r.started_at is not None), default=None)
    last_end = max((r.finished_at for r in runs if r.finished_at is not None), default=None)
    elapsed = sum((r.finished_at or now) - (r.started_at or now) for r in runs)
    idle_for = s.idle_for(mono_now)
    view = JobSession(id=s.name, access_key=s.access_key, mode="dedicated",
                      language=s.language.name, max_ttl=None, interactive_ttl=interactive_ttl,
                      environment=dict(s.environ), started_at=started, origin=s.origin,
                      state_reason=f"a {s.origin} session; it ends after "
                                   f"{s.limits.idle_timeout_s:g} s without runs"
                                   # a dead kernel says why (a restart brings a new one)
                                   + (f"; its kernel is not running: {s.state_reason}"
                                      if s.state.value == "ERROR" else ""),
                      accepting_jobs=False, elapsed=round(elapsed, 3))
    view.last_job_started, view.last_job_completed = last_start, last_end
    if s.num_queries == 0 and not s.busy:
        return view
    activated = first if first is not None else now - (mono_now - s.started)
    view.activated_at = activated
    view.state = State.ACTIVE
    view.timestamps.append((State.ACTIVE.value, activated))
    if s.idle(interactive_ttl, mono_now):
        view.state = State.INACTIVE
        view.timestamps.append((State.INACTIVE.value, now - idle_for + interactive_ttl))
    return view
