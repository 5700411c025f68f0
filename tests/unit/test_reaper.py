"""The reaper's decision (bridge.reaper.verdict) and one pass of it, over kernel-less sessions."""

from __future__ import annotations

import asyncio
import time

from bridge.reaper import CPU_CREDIT_EXHAUSTED, IDLE_TIMEOUT, Reaper, verdict
from bridge.session import Limits, Session, SessionState

from ..waiting import until
from .sessions_support import FakeKernel, attach, make_session


def idle_session(**fields: object) -> Session:
    s = make_session(**fields)
    attach(s, FakeKernel())
    s.last_activity -= 11  # idle_timeout_s is 10
    return s


def test_an_idle_session_is_reaped() -> None:
    assert verdict(idle_session()) == IDLE_TIMEOUT


def test_a_recently_active_session_is_not() -> None:
    s = idle_session()
    s.touch()
    assert verdict(s) is None


def test_a_held_session_is_not_idle_however_long() -> None:
    s = idle_session()
    with s.hold():
        s.last_activity -= 1000
        assert verdict(s) is None


def test_a_session_still_starting_is_not_idle() -> None:
    s = idle_session()
    s.kernels.clear()  # no kernel yet: a slow start is not idleness
    assert verdict(s) is None


def test_a_session_being_restarted_or_destroyed_is_left_alone() -> None:
    s = idle_session()

    async def locked() -> str | None:
        async with s.lock:
            return verdict(s)

    assert asyncio.run(locked()) is None
    s.state = SessionState.TERMINATED
    assert verdict(s) is None


def test_spent_cpu_credit_ends_a_busy_session() -> None:
    s = make_session(limits=Limits(max_cpu_credit_ms=1000, idle_timeout_s=10.0))
    kernel = attach(s, FakeKernel(cpu_ms=999))
    with s.hold():
        assert verdict(s) is None
        kernel.cpu_ms = 1001
        assert verdict(s) == CPU_CREDIT_EXHAUSTED


def test_no_credit_limit_means_none() -> None:
    s = make_session(limits=Limits(max_cpu_credit_ms=0, idle_timeout_s=10.0))
    attach(s, FakeKernel(cpu_ms=10**9))
    assert verdict(s) is None


def test_one_pass_destroys_what_the_verdict_names() -> None:
    idle, active = idle_session(id="idle"), idle_session(id="active")
    active.touch()
    destroyed: list[tuple[str, str]] = []

    async def destroy(s: Session, reason: str) -> None:
        destroyed.append((s.id, reason))

    reaper = Reaper(60, lambda: [idle, active], destroy)
    asyncio.run(reaper.reap())
    assert destroyed == [("idle", IDLE_TIMEOUT)]


def test_the_reaper_runs_on_its_interval_and_stops() -> None:
    s = idle_session()
    passes: list[float] = []

    async def destroy(_: Session, reason: str) -> None:
        passes.append(time.monotonic())

    async def scenario() -> None:
        reaper = Reaper(0.01, lambda: [s], destroy)
        reaper.start()
        await until(lambda: len(passes) >= 2, 10, "two reaper passes")
        await reaper.stop()
        stopped = len(passes)
        await asyncio.sleep(0.05)
        assert len(passes) == stopped  # stopped means no more passes

    asyncio.run(scenario())
