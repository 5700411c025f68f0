"""The Session model: a sandboxed working dir plus the kernels that run in it.

Every dialect names sessions (a Backend.AI kernel, a Sandbox session_id, a job session, a Jupyter
kernel id); all of them are this model. A session owns

* its kernels, by role (:data:`MAIN`, the language kernel; :data:`BATCH`, the bash kernel a
  batch run or a test-case runner starts on first use), each with its channel pump;
* its activity: :meth:`Session.touch` is the one way to say "something happened", and
  :meth:`Session.idle` the one place that decides idleness;
* its holds: work the run queue does not see (a cell a Jupyter client runs through a relay, a
  notebook) is done inside ``with session.hold():`` so the reaper does not take it for idle;
* its runs by id, and the policy for reusing a run id.

The registry that creates, restarts and destroys sessions is :mod:`bridge.sessions`; the FIFO
queue that runs their runs is :mod:`bridge.worker`; the reaper is :mod:`bridge.reaper`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from .admission import Ticket
from .channels import Channels
from .errors import (
    Conflict,
    InvalidRequest,
    InvalidTransition,
    KernelDied,
    LimitExceeded,
    RunNotFound,
)
from .kernels import Kernel, Usage
from .languages import Language
from .runs import Liveness, Run, RunState
from .sandbox import Confinement, Mount
from .settings import Settings
from .worker import RunQueue

MAIN = "main"  # the session's language kernel
BATCH = "batch-bash"  # the bash kernel of batch runs and test-case runners, started on first use
# What every dialect says when a session has no kernel to run on (it died, or never started).
KERNEL_NOT_RUNNING = "The session's kernel is not running; restart the session."
KERNEL_DIED = "kernel-died"  # the state_reason of a session whose kernel died during a run
# Finished runs a session remembers for clients still reading them; past KEEP_RUNS the oldest
# finished ones go, down to KEEP_RUNS_AFTER_PRUNE.
KEEP_RUNS = 64
KEEP_RUNS_AFTER_PRUNE = 32


class SessionState(enum.Enum):
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    ERROR = "ERROR"  # the kernel died; a restart brings it back
    TERMINATED = "TERMINATED"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Limits:
    """Per-session limits. Zero means no limit."""

    query_timeout_ms: int = 0
    max_cpu_credit_ms: int = 0
    mem_kib: int = 0
    idle_timeout_s: float = 600.0

    def check(self, settings: Settings) -> None:
        """Raises LimitExceeded when a limit is above the server's hard limits."""
        if settings.hard_max_mem_kib and self.mem_kib > settings.hard_max_mem_kib:
            raise LimitExceeded("maxMem", self.mem_kib, settings.hard_max_mem_kib)
        hard_t = settings.hard_max_exec_timeout_ms
        if hard_t and self.query_timeout_ms > hard_t:
            raise LimitExceeded("execTimeout", self.query_timeout_ms, hard_t)


@dataclass(frozen=True)
class Attached:
    """A kernel process of a session and the one channel pump that reads its sockets."""

    kernel: Kernel
    channels: Channels

    @classmethod
    def start(cls, kernel: Kernel) -> Attached:
        channels = Channels(kernel.client)
        channels.start()
        return cls(kernel, channels)

    def liveness(self) -> Liveness:
        return Liveness(self.channels, self.kernel.is_alive, self.kernel.interrupt)

    async def stop(self, now: bool = False) -> None:
        await self.channels.stop()
        await self.kernel.shutdown(now)


class Hold:
    """One unit of work that keeps a session busy; released once (leaving the block, or
    :meth:`release`, whichever comes first). Leaving is activity: idleness counts from then."""

    def __init__(self, session: Session) -> None:
        self._session: Session | None = session
        session._holds += 1

    def release(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session._holds -= 1
            session.touch()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


@dataclass(eq=False)
class Session:
    id: str
    name: str
    access_key: str
    language: Language
    origin: str
    limits: Limits
    workdir: Path
    mounts: tuple[Mount, ...] = ()
    environ: dict[str, str] = field(default_factory=dict)
    network: bool = False
    # What a timed-out run does to its session: "destroy" (Backend.AI; a one-shot execution's or
    # a batch job's session, which ends with its run anyway) or "restart" the kernel (sessions
    # that outlive a run: a Sandbox session_id, a dedicated job session).
    on_timeout: str = "destroy"
    # The kernelspec name a Jupyter client asked for ("python3"), shown back in its kernel
    # model, a notebook saved then keeps it; None: the language's own (kb-python).
    kernelspec: str | None = None
    created_at: str = field(default_factory=now_iso)
    state: SessionState = SessionState.RUNNING
    state_reason: str = ""

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.last_activity = time.monotonic()
        self.kernels: dict[str, Attached] = {}  # by role: MAIN, BATCH
        self.num_queries = 0
        self.queue = RunQueue()  # run by bridge.worker, one run at a time
        self.lock = asyncio.Lock()  # serialises restart/destroy against each other
        self._runs: dict[str, Run] = {}
        self._holds = 0
        self.ticket: Ticket | None = None  # its admission (a place, its memory cap)

    @property
    def alive(self) -> bool:
        return self.state is not SessionState.TERMINATED

    # -- kernels ----------------------------------------------------------------------------

    @property
    def main(self) -> Attached | None:
        return self.kernels.get(MAIN)

    @property
    def main_kernel(self) -> Kernel | None:
        main = self.kernels.get(MAIN)
        return main.kernel if main is not None else None

    def require_main(self) -> Attached:
        """The language kernel, known to be running. Raises KernelDied."""
        main = self.kernels.get(MAIN)
        if main is None or self.state is SessionState.ERROR:
            raise KernelDied(KERNEL_NOT_RUNNING)
        return main

    def liveness(self) -> Liveness:
        """The session's language kernel as a step target. Raises KernelDied."""
        return self.require_main().liveness()

    async def kernel_dead(self) -> bool:
        """Whether the language kernel is gone (the one test of kernel death): marked so, never
        attached, or its process has exited though nobody has noticed yet."""
        main = self.kernels.get(MAIN)
        return (self.state is SessionState.ERROR or main is None
                or not await main.kernel.is_alive())

    def mark_dead(self) -> None:
        """The language kernel died: the session is in ERROR until a restart."""
        self.state, self.state_reason = SessionState.ERROR, KERNEL_DIED

    def confinement(self) -> Confinement:
        return Confinement(workdir=self.workdir, ipc_dir=self.workdir, mounts=self.mounts,
                           mem_bytes=self.limits.mem_kib * 1024, network=self.network,
                           environ=dict(self.environ))

    def usage(self) -> Usage:
        usages = [a.kernel.usage() for a in self.kernels.values()]
        return Usage(cpu_ms=sum(u.cpu_ms for u in usages),
                     mem_bytes=sum(u.mem_bytes for u in usages),
                     mem_max_bytes=sum(u.mem_max_bytes for u in usages),
                     io_read_bytes=sum(u.io_read_bytes for u in usages),
                     io_write_bytes=sum(u.io_write_bytes for u in usages))

    # -- activity and holds ---------------------------------------------------------------

    def touch(self) -> None:
        """Something happened: idleness counts from now."""
        self.last_activity = time.monotonic()

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last activity (``now`` is a ``time.monotonic()`` instant)."""
        return (time.monotonic() if now is None else now) - self.last_activity

    def hold(self) -> Hold:
        """Keep the session busy until the hold is released (see :class:`Hold`)."""
        return Hold(self)

    @property
    def busy(self) -> bool:
        return self.queue.busy or self._holds > 0

    def idle(self, timeout: float | None = None, now: float | None = None) -> bool:
        """The one test of idleness: nothing running, queued or held, and no activity for
        ``timeout`` seconds (the session's idle timeout unless given)."""
        limit = self.limits.idle_timeout_s if timeout is None else timeout
        return not self.busy and self.idle_for(now) > limit

    # -- runs -------------------------------------------------------------------------------

    def add_run(self, run: Run) -> None:
        """Record a new run of this session. Raises InvalidTransition (its id is taken),
        Conflict (the running run waits for input: a run queued behind it would answer
        ``continued`` until someone answers)."""
        if run.run_id in self._runs:
            raise InvalidTransition(f"run {run.run_id}", "new", "already submitted")
        waiting = self.queue.current
        if waiting is not None and waiting.state is RunState.WAITING_INPUT:
            raise Conflict(f"Run {waiting.run_id} waits for input: answer it (mode 'input' "
                           "with that runId) or interrupt it before sending another run.")
        self._runs[run.run_id] = run
        self.num_queries += 1
        self.touch()

    def get_run(self, run_id: str) -> Run:
        """Raises RunNotFound."""
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def reuse_run_id(self, run_id: str | None) -> None:
        """A client may name a new run with the id of an old one once it has read all of the
        old one's output; the old run is forgotten. Raises InvalidRequest while it is not."""
        if not run_id:
            return
        old = self._runs.get(run_id)
        if old is not None and not old.exhausted:
            raise InvalidRequest(f"Run {run_id!r} is still in progress.")
        self._runs.pop(run_id, None)

    def started_runs(self) -> list[Run]:
        return [r for r in self._runs.values() if r.started_at is not None]

    def forget_old_runs(self) -> None:
        """Keep only runs a client may still be reading; drop the old finished ones."""
        if len(self._runs) > KEEP_RUNS:
            done = [r for r, x in self._runs.items() if x.done]
            for rid in done[:-KEEP_RUNS_AFTER_PRUNE]:
                del self._runs[rid]
