"""The Session model alone: activity, idleness, holds, the run-id policy and kernel death."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.errors import Conflict, InvalidRequest, InvalidTransition, KernelDied, RunNotFound
from bridge.runs import Run, RunState
from bridge.session import BATCH, KEEP_RUNS, KERNEL_NOT_RUNNING, SessionState

from .sessions_support import FakeKernel, attach, make_session, run_of


async def noop(run: Run) -> None:
    run.finish(0)


def test_touch_restarts_the_idle_clock() -> None:
    s = make_session()
    s.last_activity -= 30
    assert s.idle_for() >= 30
    s.touch()
    assert s.idle_for() < 1


def test_idle_only_past_the_timeout() -> None:
    s = make_session()  # idle_timeout_s=10
    now = s.last_activity
    assert not s.idle(now=now + 9.9)
    assert s.idle(now=now + 10.1)
    assert not s.idle(timeout=20, now=now + 10.1)  # another clock (a job view's TTL)


def test_a_hold_keeps_the_session_busy_and_never_idle() -> None:
    s = make_session()
    later = s.last_activity + 60
    with s.hold():
        assert s.busy and not s.idle(now=later)
    assert not s.busy and s.idle(now=time.monotonic() + 60)


def test_leaving_a_hold_is_activity() -> None:
    s = make_session()
    s.last_activity -= 100
    with s.hold():
        pass
    assert s.idle_for() < 1


def test_a_hold_released_twice_counts_once() -> None:
    s = make_session()
    outer, inner = s.hold(), s.hold()
    inner.release()
    inner.release()
    assert s.busy  # the outer one still holds
    outer.release()
    assert not s.busy


def test_an_async_hold_is_released_by_an_exception() -> None:
    s = make_session()

    async def scenario() -> None:
        async with s.hold():
            raise ValueError("cell failed")

    with pytest.raises(ValueError):
        asyncio.run(scenario())
    assert not s.busy


def test_a_queued_run_makes_the_session_busy() -> None:
    s = make_session()
    s.queue.put(run_of(noop))
    assert s.busy and s.queue.waiting == 1


def test_add_run_counts_and_touches() -> None:
    s = make_session()
    s.last_activity -= 100
    s.add_run(run_of(noop, "r1"))
    assert s.num_queries == 1 and s.idle_for() < 1
    assert s.get_run("r1").run_id == "r1" and s.has_run("r1")


def test_a_run_id_is_taken_once() -> None:
    s = make_session()
    s.add_run(run_of(noop, "r1"))
    with pytest.raises(InvalidTransition):
        s.add_run(run_of(noop, "r1"))


def test_no_run_queues_behind_one_waiting_for_input() -> None:
    s = make_session()
    waiting = run_of(noop, "asks")
    waiting.state = RunState.WAITING_INPUT
    s.queue.current = waiting
    with pytest.raises(Conflict, match="asks waits for input"):
        s.add_run(run_of(noop, "next"))


def test_a_run_id_is_reused_only_once_its_run_is_read_to_the_end() -> None:
    s = make_session()

    async def scenario() -> None:
        run = run_of(noop, "r1")
        s.add_run(run)
        with pytest.raises(InvalidRequest, match="still in progress"):
            s.reuse_run_id("r1")  # queued, not yet run
        await run.execute()
        with pytest.raises(InvalidRequest):
            s.reuse_run_id("r1")  # ended, but its last result not yet read
        await run.next_result(0.01)
        s.reuse_run_id("r1")
        with pytest.raises(RunNotFound):
            s.get_run("r1")
        s.add_run(run_of(noop, "r1"))

    asyncio.run(scenario())
    s.reuse_run_id(None)  # no id: nothing to check


def test_old_finished_runs_are_forgotten_running_ones_kept() -> None:
    s = make_session()

    async def scenario() -> None:
        live = run_of(noop, "live")
        s.add_run(live)
        for i in range(KEEP_RUNS):
            run = run_of(noop, f"r{i}")
            s.add_run(run)
            await run.execute()
        s.forget_old_runs()

    asyncio.run(scenario())
    assert s.has_run("live") and s.has_run(f"r{KEEP_RUNS - 1}") and not s.has_run("r0")
    assert len(s.started_runs()) == 32


def test_no_kernel_is_one_message() -> None:
    s = make_session()
    with pytest.raises(KernelDied, match=KERNEL_NOT_RUNNING):
        s.liveness()
    attach(s, FakeKernel())
    s.mark_dead()
    assert s.state is SessionState.ERROR and s.state_reason == "kernel-died"
    with pytest.raises(KernelDied, match=KERNEL_NOT_RUNNING):
        s.require_main()


def test_kernel_death_is_decided_in_one_place() -> None:
    s = make_session()

    async def dead() -> bool:
        return await s.kernel_dead()

    assert asyncio.run(dead())  # never attached
    kernel = attach(s, FakeKernel())
    assert not asyncio.run(dead())
    kernel.alive = False  # exited, not yet noticed by anyone
    assert asyncio.run(dead())


def test_usage_sums_every_kernel_of_the_session() -> None:
    s = make_session()
    attach(s, FakeKernel(cpu_ms=100))
    attach(s, FakeKernel(cpu_ms=50), BATCH)
    assert s.usage().cpu_ms == 150
