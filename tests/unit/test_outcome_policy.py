"""Unit tests of the outcome policy (bridge.outcomes): one exit code, failure text and reason
for each kind of run: Backend.AI queries, one-shot executions, jobs, batch runs."""

from __future__ import annotations

import asyncio
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import batch, jobs, outcomes, runs
from bridge.jobs import Job, JobStatus
from bridge.languages import resolve
from bridge.outcomes import ExitRule, RunState, StepOutcome
from bridge.runs import Program, Run, code_program
from bridge.session import BATCH, Attached

from .fake_kernel import FakeKernel, pumping, target


@pytest.fixture(autouse=True)
def quick_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look at the kernel every 50 ms instead of 500: a dead kernel is seen sooner, the same way."""
    monkeypatch.setattr(runs, "LIVENESS_INTERVAL", 0.05)

Script = Any


@pytest.mark.parametrize(("reply", "query", "program"), [
    ({"status": "ok"}, 0, 0),
    ({"status": "error", "ename": "ValueError", "evalue": "bad"}, 0, 1),
    ({"status": "error", "ename": "SystemExit", "evalue": "3"}, 0, 3),
    ({"status": "error", "ename": "SystemExit", "evalue": "None"}, 0, 0),
    ({"status": "error", "ename": "SystemExit", "evalue": "'bye'"}, 0, 1),
    ({"status": "error", "ename": "ExitCode", "exit_code": 2}, 2, 2),  # a process kernel
    ({"status": "ok", "exit_code": "7"}, 0, 0),  # a field of the wrong type is left out
])
def test_each_rule_reads_the_reply_its_way(reply: dict[str, Any], query: int,
                                           program: int) -> None:
    outcome = StepOutcome.from_reply(reply)
    assert outcome.exit_code(ExitRule.QUERY) == query
    assert outcome.exit_code(ExitRule.PROGRAM) == program


def run_of(script: Script, rule: ExitRule, timeout: float | None = None,
           program: Program | None = None) -> Run:
    async def go() -> Run:
        kernel = FakeKernel()
        kernel.on("execute_request", script)
        async with pumping(kernel) as channels:
            run = Run(run_id="r", mode="query", code="x", timeout=timeout,
                      program=program or code_program(lambda: target(kernel, channels), rule))
            await run.execute()
        return run

    return asyncio.run(go())


def raises(k: FakeKernel, req: dict[str, Any]) -> None:
    k.raised(req, "ZeroDivisionError", "division by zero")


def test_a_query_that_raises_exits_0_as_backendai_does() -> None:
    run = run_of(raises, ExitRule.QUERY)
    assert run.state is RunState.FINISHED and run.exit_code == 0
    assert "ZeroDivisionError" in run.text("stderr")


def test_a_one_shot_that_raises_exits_1_in_its_result() -> None:
    run = run_of(raises, ExitRule.PROGRAM)
    assert run.exit_code == 1 and outcomes.exit_code(run) == 1
    assert outcomes.ending(run).reason == outcomes.RUNTIME_ERROR


def a_job(timeout: float = 30) -> Job:
    job = Job(id="j", session_id="s", access_key="k", seq=0, code="x", language="python",
              timeout=timeout)
    job.status, job.started_at = JobStatus.RUNNING, 1.0
    return job


def test_a_job_that_raises_reports_the_exit_code_its_run_has() -> None:
    """The old disagreement: the run said 0 (a query's rule) while the job reported 1."""
    run = run_of(raises, jobs.EXIT_RULE)
    job = a_job()
    job.record(run)
    assert job.status is JobStatus.COMPLETED and job.exit_code == run.exit_code == 1


def test_a_timed_out_job_and_execution_fail_with_minus_1_and_say_so() -> None:
    def busy(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.stream(req, "partial\n", name="stderr")

    run = run_of(busy, ExitRule.PROGRAM, timeout=0.2)
    assert run.state is RunState.TIMED_OUT
    job = a_job(timeout=0.2)
    job.record(run)
    assert job.status is JobStatus.FAILED and job.exit_code == outcomes.FAILED_EXIT_CODE == -1
    assert job.stderr == "partial\nExecution timed out after 0.2 s.\n"
    assert outcomes.failed_stderr(run, 0.2) == job.stderr  # the one-shot's words are the same
    assert outcomes.ending(run).reason == outcomes.TIMEOUT


def test_a_dead_kernel_is_said_once_in_a_failed_result() -> None:
    def die(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.alive = False

    run = run_of(die, ExitRule.PROGRAM, timeout=5)
    assert run.state is RunState.FAILED and run.exit_code == outcomes.KILLED_EXIT_CODE
    assert outcomes.exit_code(run) == -1 and outcomes.failure(run, 5) == outcomes.KERNEL_DIED
    assert outcomes.failed_stderr(run, 5) == outcomes.KERNEL_DIED + "\n"
    assert outcomes.ending(run).reason == outcomes.KILLED
    assert outcomes.ending(run, ooms=1) == outcomes.Ending(outcomes.MEMORY_LIMIT, signal.SIGKILL)


def test_a_cancelled_run_says_the_session_ended_first() -> None:
    run = Run(run_id="r", mode="query", code="x", program=code_program(
        lambda: pytest.fail("never started"), ExitRule.PROGRAM))
    run.cancel("Session ended: user-requested.")
    assert outcomes.exit_code(run) == -1
    assert outcomes.failed_stderr(run, 30) == ("Session ended: user-requested.\n"
                                               f"{outcomes.SESSION_ENDED_FIRST}\n")
    assert outcomes.ending(run).reason == outcomes.KILLED


def test_a_compile_error_and_a_signal_are_told_apart() -> None:
    def compile_fails(k: FakeKernel, req: dict[str, Any]) -> None:
        k.finish(req, status="error", ename="ExitCode", exit_code=1, stage="compile",
                 compile_stdout="", compile_stderr="main.c:1: error\n")

    run = run_of(compile_fails, ExitRule.PROGRAM)
    assert outcomes.ending(run).reason == outcomes.COMPILE_ERROR

    def segfault(k: FakeKernel, req: dict[str, Any]) -> None:
        k.finish(req, status="error", ename="ExitCode", exit_code=139, signal=11)

    run = run_of(segfault, ExitRule.PROGRAM)
    assert run.exit_code == 139
    assert outcomes.ending(run) == outcomes.Ending(outcomes.RUNTIME_ERROR, signal.SIGSEGV)


def batch_run(options: dict[str, Any], codes: dict[str, int]) -> tuple[Run, list[Any]]:
    """A batch run on a scripted bash kernel; ``codes``: exit code by command word."""
    def script(k: FakeKernel, req: dict[str, Any]) -> None:
        code = req["content"]["code"]
        word = next((w for w in codes if w in code), None)
        k.finish(req, status="error" if word else "ok", exit_code=codes[word] if word else 0)

    async def go() -> tuple[Run, list[Any]]:
        kernel = FakeKernel()
        kernel.on("execute_request", script)
        async with pumping(kernel) as channels:
            attached = Attached(kernel, channels)  # type: ignore[arg-type]
            session: Any = SimpleNamespace(kernels={BATCH: attached})
            opts = batch.BatchOptions.parse(options, resolve("c"))
            run = Run(run_id="b", mode="batch", code="",
                      program=batch.program(session, opts, start_kernel=None))  # type: ignore[arg-type]
            await run.execute()
        marks = []
        while not run.exhausted:
            r = await run.next_result(0.01)
            if r.status != "continued":
                marks.append((r.status, r.exit_code))
        return run, marks

    return asyncio.run(go())


def test_a_batch_run_reports_each_step_and_127_after_a_failed_build() -> None:
    _, marks = batch_run({"clean": "rm -f x", "build": "make", "exec": "./main"},
                           {"make": 2})
    assert marks == [("clean-finished", 0), ("build-finished", 2),
                     ("finished", outcomes.BUILD_FAILED_EXIT_CODE)]
    _, marks = batch_run({"build": "make", "exec": "./main"}, {"./main": 5})
    assert marks == [("build-finished", 0), ("finished", 5)]


def test_a_finished_run_that_still_failed_is_the_judge_stopping_early() -> None:
    """Only the test-case runner's run can finish without a result: its records stopped."""
    run = run_of(lambda k, req: k.finish(req), ExitRule.PROGRAM)
    assert run.state is RunState.FINISHED
    assert outcomes.failure(run, 5) == outcomes.RUNNER_STOPPED
