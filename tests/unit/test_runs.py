"""Unit tests of the run state machine (bridge.runs) over a scripted kernel: states and marks,
console merging, output caps, input, the deadline and a dying kernel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge import runs
from bridge.errors import InvalidTransition, KernelStartFailed
from bridge.outcomes import KERNEL_DIED, ExitRule, RunState
from bridge.runs import Program, Result, Run, code_program

from .fake_kernel import FakeKernel, pumping, run_async, target


@pytest.fixture(autouse=True)
def quick_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look at the kernel every 50 ms instead of 500: a dead kernel is seen sooner, the same way."""
    monkeypatch.setattr(runs, "LIVENESS_INTERVAL", 0.05)


async def a_run(kernel: FakeKernel, code: str = "x", *, program: Program | None = None,
                **kwargs: Any) -> Run:
    """A run of ``code`` on ``kernel`` (query rule unless ``program``), executed to its end."""
    async with pumping(kernel) as channels:
        program = program or code_program(lambda: target(kernel, channels), ExitRule.QUERY)
        run = Run(run_id=Run.new_id(), mode="query", code=code, program=program, **kwargs)
        async with asyncio.timeout(10):
            await run.execute()
        return run


async def results(run: Run) -> list[Result]:
    out = []
    while not run.exhausted:
        out.append(await run.next_result(0.01))
    return [r for r in out if r.status != "continued" or r.console]


@run_async
async def test_a_run_goes_from_queued_through_running_to_finished() -> None:
    kernel = FakeKernel()
    seen: list[tuple[str, dict[str, Any]]] = []
    kernel.on("execute_request", lambda k, req: k.finish(req, stdout="hi\n"))
    async with pumping(kernel) as channels:
        run = Run(run_id="r1", mode="query", code="print('hi')",
                  program=code_program(lambda: target(kernel, channels), ExitRule.QUERY))
        run.observers.append(lambda event, data: seen.append((event, data)))
        assert run.state is RunState.QUEUED and not run.done
        await run.execute()
    assert run.state is RunState.FINISHED and run.exit_code == 0 and run.done
    assert [e for e, _ in seen] == ["status", "stdout", "end"]
    assert seen[-1][1] == {"status": "finished", "exit_code": 0}
    with pytest.raises(InvalidTransition, match="expected state queued, got finished"):
        await run.execute()
    with pytest.raises(InvalidTransition):
        run.feed_input("too late")


@run_async
async def test_console_items_are_merged_per_stream_in_order() -> None:
    def script(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.stream(req, "a")
        k.stream(req, "b\n")
        k.stream(req, "oops\n", name="stderr")
        k.stream(req, "c\n")
        k.emit("iopub", "execute_result",
               {"data": {"text/plain": "\x1b[1m42\x1b[0m"}, "execution_count": 1}, req)
        k.emit("iopub", "display_data", {"data": {"text/html": "<b>x</b>"}}, req)
        k.reply(req)
        k.status(req, "idle")

    kernel = FakeKernel()
    kernel.on("execute_request", script)
    run = await a_run(kernel)
    [result] = await results(run)
    assert result.status == "finished" and result.exit_code == 0
    assert result.console == [["stdout", "ab\n"], ["stderr", "oops\n"], ["stdout", "c\n42\n"],
                              ["html", "<b>x</b>"]]


@run_async
async def test_a_traceback_goes_to_stderr_without_ansi() -> None:
    kernel = FakeKernel()
    kernel.on("execute_request", lambda k, req: k.raised(req, "ValueError", "bad"))
    run = await a_run(kernel)
    assert run.text("stderr") == "ValueError: bad\n" and run.state is RunState.FINISHED


@run_async
async def test_output_past_the_cap_is_cut_noted_and_interrupted() -> None:
    async def flood(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.stream(req, "x" * 60)
        while k.interrupts == 0:  # the run must stop the flood itself
            k.stream(req, "y" * 100)
            await asyncio.sleep(0.005)
        k.reply(req, status="error", ename="KeyboardInterrupt")
        k.status(req, "idle")

    kernel = FakeKernel()
    kernel.on("execute_request", flood)
    run = await a_run(kernel, output_limit=100)
    out = run.text("stdout")
    assert out == "x" * 60 + "y" * 40  # a chunk is cut to fit, later ones dropped
    assert run.truncated and kernel.interrupts >= 1
    assert "output limit of 100 bytes reached" in run.text("stderr")
    assert run.state is RunState.FINISHED


@run_async
async def test_a_flood_is_interrupted_once_not_again_while_it_unwinds() -> None:
    """A second SIGINT while the kernel handles the first can kill it (REINTERRUPT_AFTER_S)."""
    async def ignores_interrupts(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        for _ in range(30):  # output past the cap for several ticks, whatever the interrupts
            k.stream(req, "y" * 100)
            await asyncio.sleep(0.01)
        k.finish(req)

    kernel = FakeKernel()
    kernel.on("execute_request", ignores_interrupts)
    run = await a_run(kernel, output_limit=100)
    assert run.truncated and kernel.interrupts == 1


@run_async
async def test_output_after_the_reply_is_not_interrupted() -> None:
    """Once the code ended, what still arrives was in flight: nothing to stop."""
    async def tail_after_reply(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.reply(req)
        for _ in range(20):  # longer than a liveness tick
            k.stream(req, "z" * 100)
            await asyncio.sleep(0.01)
        k.status(req, "idle")

    kernel = FakeKernel()
    kernel.on("execute_request", tail_after_reply)
    run = await a_run(kernel, output_limit=100)
    assert run.truncated and kernel.interrupts == 0


@run_async
async def test_a_run_asks_for_input_and_goes_on_with_the_answer() -> None:
    answered = asyncio.Event()

    async def script(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.stream(req, "name? ")
        await asyncio.sleep(0.01)
        k.emit("stdin", "input_request", {"prompt": "", "password": True}, req)
        await answered.wait()
        k.stream(req, f"hello {k.inputs[-1]}\n")
        k.reply(req)
        k.status(req, "idle")

    kernel = FakeKernel()
    kernel.expect_input(lambda value: answered.set())
    kernel.on("execute_request", script)
    async with pumping(kernel) as channels:
        run = Run(run_id="r", mode="query", code="input()",
                  program=code_program(lambda: target(kernel, channels), ExitRule.QUERY))
        task = asyncio.create_task(run.execute())
        first = await run.next_result(2.0)
        assert first.status == "waiting-input" and first.options == {"is_password": True}
        assert first.console == [["stdout", "name? "]] and run.state is RunState.WAITING_INPUT
        run.feed_input("ada")
        assert run.state is RunState.RUNNING
        await task
    last = await run.next_result(0.5)
    assert last.status == "finished" and last.console == [["stdout", "hello ada\n"]]


@run_async
async def test_preset_stdin_answers_line_by_line_then_end_of_file() -> None:
    async def script(k: FakeKernel, req: dict[str, Any]) -> None:
        for _ in range(3):
            got = len(k.inputs)
            k.emit("stdin", "input_request", {"prompt": ""}, req)
            while len(k.inputs) == got:
                await asyncio.sleep(0.005)
        k.finish(req)

    kernel = FakeKernel()
    kernel.on("execute_request", script)
    run = await a_run(kernel, stdin="one\ntwo")
    assert kernel.inputs == ["one", "two", "\x04"] and run.state is RunState.FINISHED


@run_async
async def test_the_deadline_times_the_run_out() -> None:
    kernel = FakeKernel()
    kernel.on("execute_request", lambda k, req: k.status(req, "busy"))  # runs forever
    run = await a_run(kernel, timeout=0.2)
    assert run.state is RunState.TIMED_OUT and run.exit_code is None
    assert [(r.status, r.exit_code) for r in await results(run)] == [("exec-timeout", None)]


@run_async
async def test_a_dead_kernel_fails_the_run_with_130() -> None:
    def die(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.alive = False

    kernel = FakeKernel()
    kernel.on("execute_request", die)
    run = await a_run(kernel, timeout=5)
    assert run.state is RunState.FAILED and run.exit_code == 130
    assert run.error == KERNEL_DIED and run.text("stderr") == KERNEL_DIED + "\n"
    assert [(r.status, r.exit_code) for r in await results(run)] == [("finished", 130)]


@run_async
async def test_a_program_that_cannot_start_fails_the_run_with_1() -> None:
    async def program(run: Run) -> None:
        raise KernelStartFailed("The batch kernel did not start.")

    run = await a_run(FakeKernel(), program=program)
    assert run.state is RunState.FAILED and run.exit_code == 1
    assert run.error is not None and run.error in run.text("stderr")


def test_a_queued_run_cancelled_ends_with_130_and_says_why() -> None:
    async def never(run: Run) -> None:
        raise AssertionError("a cancelled run never runs")

    async def go() -> Run:
        run = Run(run_id="r", mode="query", code="x", program=never)
        run.cancel("Session ended: idle-timeout.")
        await run.wait()
        return run

    run = asyncio.run(go())
    assert run.state is RunState.CANCELLED and run.done
    assert run.text("stderr") == "Session ended: idle-timeout.\n"
    assert run.error == "Session ended: idle-timeout."
