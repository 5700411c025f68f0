"""The Session model: a sandboxed working dir plus the kernels that run in it.

Every dialect names sessions (a Backend.AI kernel, a Sandbox session_id, a job session, a Jupyter
kernel id); all of them are this model. The registry that creates, runs and reaps them is
:mod:`bridge.sessions`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .admission import Ticket
from .channels import Channels
from .errors import KernelDied, LimitExceeded
from .kernels import Kernel, Usage
from .languages import Language
from .runs import Liveness, Run
from .sandbox import Confinement, Mount
from .settings import Settings


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
    on_timeout: str = "destroy"  # "destroy" (Backend.AI) or "restart" (one-shot dialects)
    created_at: str = field(default_factory=now_iso)
    state: SessionState = SessionState.RUNNING
    state_reason: str = ""

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.last_activity = time.monotonic()
        self.kernel: Kernel | None = None
        self.channels: Channels | None = None
        self.extra_kernels: dict[str, tuple[Kernel, Channels]] = {}  # e.g. the batch bash kernel
        self.runs: dict[str, Run] = {}
        self.num_queries = 0
        self._queue: asyncio.Queue[Run] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.current: Run | None = None
        self.lock = asyncio.Lock()  # serialises restart/destroy against each other
        # Work the run queue does not see (a cell a Jupyter client runs through a relay) holds
        # the session busy so the reaper does not take it for idle.
        self.holds = 0
        self.ticket: Ticket | None = None  # its admission (a place, its memory cap)

    @property
    def alive(self) -> bool:
        return self.state is not SessionState.TERMINATED

    @property
    def queued(self) -> int:
        """Runs waiting for the kernel (the current one not counted)."""
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self.current is not None or not self._queue.empty() or self.holds > 0

    def confinement(self) -> Confinement:
        return Confinement(workdir=self.workdir, ipc_dir=self.workdir, mounts=self.mounts,
                           mem_bytes=self.limits.mem_kib * 1024, network=self.network,
                           environ=dict(self.environ))

    def liveness(self) -> Liveness:
        """The session's language kernel as a step target. Raises KernelDied."""
        if self.kernel is None or self.channels is None or self.state is SessionState.ERROR:
            raise KernelDied("The session's kernel is not running; restart the session.")
        return Liveness(self.channels, self.kernel.is_alive, self.kernel.interrupt)

    def usage(self) -> Usage:
        kernels = [k for k, _ in self.extra_kernels.values()]
        if self.kernel is not None:
            kernels.append(self.kernel)
        usages = [k.usage() for k in kernels]
        return Usage(cpu_ms=sum(u.cpu_ms for u in usages),
                     mem_bytes=sum(u.mem_bytes for u in usages),
                     mem_max_bytes=sum(u.mem_max_bytes for u in usages),
                     io_read_bytes=sum(u.io_read_bytes for u in usages),
                     io_write_bytes=sum(u.io_write_bytes for u in usages))
