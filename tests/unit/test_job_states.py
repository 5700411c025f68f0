"""The job session state machine (bridge.jobs) and what its deadlines do (bridge.job_reaper)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.errors import InvalidTransition
from bridge.job_reaper import Action, JobReaper, due_action
from bridge.jobs import Job, JobSession, JobStatus, State
from bridge.outcomes import FAILED_EXIT_CODE

T0 = 1_000_000.0


def job_session(**fields: object) -> JobSession:
    defaults: dict[str, object] = {"id": "js", "access_key": "AK", "mode": "dedicated",
                                   "language": "python", "max_ttl": 100,
                                   "interactive_ttl": 10, "started_at": T0}
    return JobSession(**{**defaults, **fields})  # type: ignore[arg-type]


def job(seq: int = 0) -> Job:
    return Job(id=f"j{seq}", session_id="js", access_key="AK", seq=seq, code="", language="python",
               timeout=5, created_at=T0)


def states(js: JobSession) -> list[str]:
    return [s for s, _ in js.timestamps]


def test_the_first_job_activates_and_starts_the_max_ttl() -> None:
    js, j = job_session(), job()
    js.job_started(j, T0 + 5)
    assert js.state is State.ACTIVE and js.activated_at == T0 + 5
    assert js.max_deadline == T0 + 105 and js.open_deadline is None
    assert js.idle_deadline is None  # a job runs: no interactive TTL
    assert states(js) == ["open", "active"]


def test_the_interactive_ttl_starts_after_each_job() -> None:
    js, j = job_session(), job()
    j.started_at = T0 + 5  # as the worker stamps it
    js.job_started(j, T0 + 5)
    js.job_ended(j, T0 + 7)
    assert js.idle_deadline == T0 + 17 and js.elapsed == 2.0 and js.last_job_completed == T0 + 7
    js.transition(State.INACTIVE, "idle", T0 + 17)
    assert js.idle_deadline is None
    js.job_started(job(1), T0 + 20)  # inactive → active again; max_ttl does not restart
    assert js.state is State.ACTIVE and js.max_deadline == T0 + 105
    assert states(js) == ["open", "active", "inactive", "active"]


def test_a_session_that_stops_accepting_gets_no_idle_deadline() -> None:
    js, j = job_session(), job()
    js.job_started(j, T0)
    js.accepting_jobs = False
    js.job_ended(j, T0 + 1)
    assert js.idle_deadline is None


@pytest.mark.parametrize(("start", "to"), [
    (State.OPEN, State.INACTIVE), (State.ACTIVE, State.OPEN), (State.INACTIVE, State.OPEN),
    (State.CLOSED, State.ACTIVE), (State.CLOSED, State.OPEN)])
def test_transitions_the_machine_forbids(start: State, to: State) -> None:
    js = job_session(state=start)
    with pytest.raises(InvalidTransition):
        js.transition(to, "no")
    assert js.state is start


def test_closing_clears_every_deadline_and_stops_accepting() -> None:
    js = job_session()
    js.job_started(job(), T0)
    js.transition(State.CLOSED, "done", T0 + 1)
    assert js.closed_at == T0 + 1 and not js.accepting_jobs
    assert js.next_deadline() is None and js.active_ttl() == 0


def test_a_job_ends_once() -> None:
    j = job()
    j.started_at = T0
    j.end(JobStatus.FAILED, FAILED_EXIT_CODE, stderr="x", at=T0 + 2)
    assert j.execution_time == 2.0 and j.status.terminal
    with pytest.raises(InvalidTransition):
        j.end(JobStatus.COMPLETED, 0)


def test_what_each_deadline_does() -> None:
    js = job_session(open_deadline=T0 + 30)
    assert due_action(js, T0 + 30, 30) == (Action.WIND_DOWN,
                                           "no job was submitted within 30 s")
    js.job_started(job(), T0 + 1)
    assert due_action(js, js.max_deadline or 0, 30)[0] is Action.WIND_DOWN
    js.idle_deadline = T0 + 50
    assert due_action(js, T0 + 50, 30)[0] is Action.NOTHING  # a job still runs
    js.running.clear()
    assert due_action(js, T0 + 50, 30) == (Action.INACTIVE,
                                           "no job for the interactive_ttl of 10 s")


def test_deadlines_that_passed_fire_in_order_stamped_with_their_own_time() -> None:
    js, j = job_session(), job()
    js.job_started(j, T0)
    js.job_ended(j, T0 + 1)  # idle at T0 + 11, max_ttl at T0 + 100
    wound: list[tuple[str, float]] = []
    saved: list[str] = []

    async def wind_down(s: JobSession, reason: str, at: float) -> None:
        wound.append((reason, at))
        s.transition(State.CLOSED, reason, at)

    async def save(s: JobSession) -> None:
        saved.append(s.state.value)

    reaper = JobReaper({js.id: js}, wind_down, save, open_ttl=30)
    asyncio.run(reaper.fire_due(T0 + 500))  # e.g. the server was down meanwhile
    assert js.timestamps[-2:] == [("inactive", T0 + 11), ("closed", T0 + 100)]
    assert wound == [("max_ttl of 100 s reached", T0 + 100)] and saved == ["inactive"]
