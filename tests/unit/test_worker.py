"""The run queue (bridge.worker): one run at a time, FIFO, and what a run's end does to its
session — over kernel-less sessions and scripted programs."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.errors import KernelDied
from bridge.runs import Run, RunState
from bridge.session import Session, SessionState
from bridge.worker import EXEC_TIMEOUT, Worker

from ..waiting import until
from .sessions_support import FakeKernel, attach, make_session, run_of


class Records:
    """Stands in for SessionRecords: what the worker would write."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.states: list[str] = []

    async def run_ended(self, session: Session, run: Run) -> None:
        self.ended.append((run.run_id, run.state.value))

    async def set_state(self, session: Session) -> None:
        self.states.append(session.state.value)


class Registry:
    def __init__(self) -> None:
        self.records = Records()
        self.restarted: list[str] = []
        self.destroyed: list[str] = []
        self.worker = Worker(self.records, self.restart, self.destroy)  # type: ignore[arg-type]

    async def restart(self, session: Session) -> None:
        self.restarted.append(session.id)

    async def destroy(self, session: Session, reason: str) -> None:
        self.destroyed.append(reason)


def test_runs_execute_one_at_a_time_in_order() -> None:
    log: list[str] = []

    def program(name: str) -> Any:
        async def run_it(run: Run) -> None:
            log.append(f"start {name}")
            await asyncio.sleep(0.02)
            log.append(f"end {name}")
            run.finish(0)
        return run_it

    async def scenario() -> Registry:
        reg, s = Registry(), make_session()
        reg.worker.start(s)
        runs = [run_of(program(n), n) for n in "abc"]
        for run in runs:
            s.queue.put(run)
        assert s.busy
        await until(lambda: len(reg.records.ended) == 3)
        await until(lambda: not s.busy)
        s.queue.close("test over")
        return reg

    reg = asyncio.run(scenario())
    assert log == ["start a", "end a", "start b", "end b", "start c", "end c"]
    assert reg.records.ended == [("a", "finished"), ("b", "finished"), ("c", "finished")]


def test_a_run_whose_kernel_died_puts_the_session_in_error() -> None:
    async def scenario() -> tuple[Registry, Session]:
        reg, s = Registry(), make_session()
        kernel = attach(s, FakeKernel())

        async def crash(run: Run) -> None:
            kernel.alive = False
            raise KernelDied("gone")

        reg.worker.start(s)
        s.queue.put(run_of(crash, "r"))
        await until(lambda: reg.records.ended)
        s.queue.close("test over")
        return reg, s

    reg, s = asyncio.run(scenario())
    assert s.state is SessionState.ERROR and reg.records.states == ["ERROR"]
    assert reg.records.ended == [("r", "failed")]


def test_a_timed_out_run_destroys_or_restarts_as_the_session_says() -> None:
    async def hang(run: Run) -> None:
        await asyncio.sleep(60)

    async def scenario(on_timeout: str) -> Registry:
        reg, s = Registry(), make_session(on_timeout=on_timeout)
        attach(s, FakeKernel())
        reg.worker.start(s)
        run = Run(run_id="slow", mode="query", code="", program=hang, timeout=0.05)
        s.queue.put(run)
        await until(lambda: reg.destroyed or reg.restarted)
        s.queue.close("test over")
        assert run.state is RunState.TIMED_OUT
        return reg

    destroyed = asyncio.run(scenario("destroy"))
    assert destroyed.destroyed == [EXEC_TIMEOUT] and not destroyed.restarted
    restarted = asyncio.run(scenario("restart"))
    assert restarted.restarted == ["s1"] and not restarted.destroyed


def test_closing_the_queue_cancels_what_waits() -> None:
    async def scenario() -> Run:
        s = make_session()
        waiting = run_of(lambda run: asyncio.sleep(0), "w")
        s.queue.put(waiting)
        s.queue.close("destroyed")
        return waiting

    run = asyncio.run(scenario())
    assert run.state is RunState.CANCELLED
