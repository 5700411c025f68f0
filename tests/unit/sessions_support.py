"""Sessions with no kernel process and no server: the model alone, for unit tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bridge.kernels import Usage
from bridge.languages import resolve
from bridge.runs import Program, Run
from bridge.session import MAIN, Attached, Limits, Session


def make_session(**fields: Any) -> Session:
    defaults: dict[str, Any] = {
        "id": "s1", "name": "s1", "access_key": "AKTEST", "language": resolve("python"),
        "origin": "backendai", "limits": Limits(idle_timeout_s=10.0),
        "workdir": Path("/nonexistent/s1")}
    return Session(**{**defaults, **fields})


class FakeKernel:
    """What a session asks of a kernel process: is it alive, what has it used."""

    def __init__(self, alive: bool = True, cpu_ms: int = 0) -> None:
        self.alive = alive
        self.cpu_ms = cpu_ms
        self.cgroup = None

    async def is_alive(self) -> bool:
        return self.alive

    async def interrupt(self) -> None:
        pass

    def usage(self) -> Usage:
        return Usage(cpu_ms=self.cpu_ms, mem_bytes=0, mem_max_bytes=0)


def attach(session: Session, kernel: FakeKernel, role: str = MAIN) -> FakeKernel:
    session.kernels[role] = Attached(kernel, SimpleNamespace())  # type: ignore[arg-type]
    return kernel


def run_of(program: Program, run_id: str | None = None) -> Run:
    return Run(run_id=run_id or Run.new_id(), mode="query", code="", program=program,
               timeout=5.0)
