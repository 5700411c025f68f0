"""Unit tests of the channel pump's routing by msg_id and of the one request primitive
(bridge.channels), over a scripted kernel's real, signed messages."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.channels import Exchange, Watch
from bridge.errors import KernelDied
from bridge.messages import Channel, Message
from bridge.pool import warm_up

from .fake_kernel import FakeKernel, Script, pumping, run_async, settle

EXECUTE: dict[str, Any] = {"code": "x", "silent": False, "store_history": True,
                           "user_expressions": {}, "allow_stdin": False, "stop_on_error": False}


class Inbox:
    """A sink that keeps what it was given."""

    def __init__(self) -> None:
        self.got: list[tuple[Channel, str, dict[str, Any]]] = []

    def __call__(self, channel: Channel, msg: Message) -> None:
        self.got.append((channel, msg["header"].get("msg_type", ""), dict(msg["content"])))

    def texts(self) -> list[str]:
        return [c["text"] for _, t, c in self.got if t == "stream"]


@run_async
async def test_messages_go_to_the_request_they_answer() -> None:
    kernel = FakeKernel()
    async with pumping(kernel) as channels:
        a, b = Inbox(), Inbox()
        id_a = channels.send("execute_request", EXECUTE, a)
        id_b = channels.send("execute_request", EXECUTE, b)
        req_a, req_b = (m for _, m in kernel.requests)
        assert (req_a["header"]["msg_id"], req_b["header"]["msg_id"]) == (id_a, id_b)
        kernel.stream(req_b, "for b\n")
        kernel.stream(req_a, "for a\n")
        kernel.stream(req_b, "b again\n")
        kernel.reply(req_a)
        await settle()
        assert a.texts() == ["for a\n"] and b.texts() == ["for b\n", "b again\n"]
        assert ("shell", "execute_reply") in [(c, t) for c, t, _ in a.got]


@run_async
async def test_stray_late_and_forged_messages_reach_nobody() -> None:
    kernel = FakeKernel()
    async with pumping(kernel) as channels:
        inbox = Inbox()
        msg_id = channels.send("execute_request", EXECUTE, inbox)
        req = kernel.requests[0][1]
        kernel.stream({"header": {"msg_id": "someone-else"}}, "stray\n")  # another client's
        kernel.stream(None, "no parent\n")
        kernel.emit("iopub", "stream", {"name": "stdout", "text": "forged\n"}, req, forged=True)
        kernel.stream(req, "mine\n")
        await settle()
        channels.release(msg_id)
        kernel.stream(req, "late\n")  # after the request ended (a timed-out run's output)
        await settle()
        assert inbox.texts() == ["mine\n"]


@run_async
async def test_unclaimed_messages_go_to_the_default_sink() -> None:
    kernel = FakeKernel()
    everyone = Inbox()
    async with pumping(kernel, default=everyone) as channels:
        mine = Inbox()
        channels.send("execute_request", EXECUTE, mine)
        req = kernel.requests[0][1]
        kernel.stream({"header": {"msg_id": "other"}}, "broadcast\n")
        kernel.stream(req, "claimed\n")
        await settle()
        assert everyone.texts() == ["broadcast\n"] and mine.texts() == ["claimed\n"]


@run_async
async def test_output_past_the_budget_is_counted_not_decoded() -> None:
    class Budget:
        room = 5
        dropped = 0

        def output_room(self) -> int:
            return self.room

        def output_dropped(self, size: int) -> None:
            self.dropped += size

    kernel = FakeKernel()
    async with pumping(kernel) as channels:
        inbox, budget = Inbox(), Budget()
        channels.send("execute_request", EXECUTE, inbox, output=budget)
        req = kernel.requests[0][1]
        kernel.stream(req, "kept\n")
        await settle()
        budget.room = 0
        kernel.stream(req, "x" * 1000)
        kernel.status(req, "idle")  # not output: still routed
        await settle()
        assert inbox.texts() == ["kept\n"] and budget.dropped > 1000
        assert [t for _, t, _ in inbox.got] == ["stream", "status"]


# -- the request primitive -------------------------------------------------------------------


async def request_with(script: Script, **kwargs: Any) -> tuple[Exchange, float]:
    """An execute_request answered by ``script``: what came back, and how long it took."""
    kernel = FakeKernel()
    kernel.on("execute_request", script)
    async with pumping(kernel) as channels:
        t0 = time.monotonic()
        ex = await channels.request("execute_request", EXECUTE, **kwargs)
        return ex, time.monotonic() - t0


@run_async
async def test_a_reply_before_idle_waits_for_idle_and_its_output() -> None:
    async def script(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "busy")
        k.reply(req, execution_count=1)
        await asyncio.sleep(0.1)
        k.stream(req, "flushed after the reply\n")
        k.status(req, "idle")

    inbox = Inbox()
    ex, took = await request_with(script, on_message=inbox)
    assert ex.reply is not None and ex.idle and ex.content["execution_count"] == 1
    assert inbox.texts() == ["flushed after the reply\n"]
    assert took >= 0.09


@run_async
async def test_idle_before_the_reply_waits_for_the_reply() -> None:
    async def script(k: FakeKernel, req: dict[str, Any]) -> None:
        k.status(req, "idle")
        await asyncio.sleep(0.1)
        k.reply(req, status="error", ename="ValueError")

    ex, took = await request_with(script)
    assert ex.idle and ex.content["ename"] == "ValueError" and took >= 0.09


@run_async
async def test_without_idle_the_iopub_grace_ends_the_wait() -> None:
    def idle_never_comes(k: FakeKernel, req: dict[str, Any]) -> None:
        k.reply(req)

    ex, took = await request_with(idle_never_comes, iopub_grace=0.2)
    assert ex.reply is not None and not ex.idle
    assert 0.15 <= took < 2.0


@run_async
async def test_the_grace_counts_from_the_last_output_not_from_the_reply() -> None:
    async def script(k: FakeKernel, req: dict[str, Any]) -> None:
        k.reply(req)
        for i in range(6):  # twice the grace of output after the reply, each gap under it
            await asyncio.sleep(0.05)
            k.stream(req, f"{i}\n")
        k.status(req, "idle")

    inbox = Inbox()
    ex, _ = await request_with(script, on_message=inbox, iopub_grace=0.15)
    assert ex.idle and inbox.texts() == [f"{i}\n" for i in range(6)]


@run_async
async def test_the_callers_deadline_ends_the_wait_and_frees_the_route() -> None:
    kernel = FakeKernel()
    kernel.on("execute_request", lambda k, req: k.status(req, "busy"))  # never answers
    async with pumping(kernel) as channels:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await channels.request("execute_request", EXECUTE)
        assert time.monotonic() - t0 < 1.0
        assert channels._routes == {}


@run_async
async def test_a_reply_alone_is_enough_unless_idle_is_asked_for() -> None:
    kernel = FakeKernel()
    kernel.on("complete_request", lambda k, req: k.reply(req, matches=["print"]))
    async with pumping(kernel) as channels:
        async with asyncio.timeout(2):
            ex = await channels.request("complete_request", {"code": "pr", "cursor_pos": 2},
                                        until_idle=False)
        assert ex.content["matches"] == ["print"]


@run_async
async def test_a_reset_channel_is_not_waited_for() -> None:
    kernel = FakeKernel()
    kernel.on("execute_request", lambda k, req: k.status(req, "idle"))  # the reply is lost
    async with pumping(kernel) as channels:
        task = asyncio.create_task(channels.request("execute_request", EXECUTE))
        await asyncio.sleep(0.05)
        assert not task.done()  # idle alone is not the end while the reply may still come
        channels._reset("shell")
        async with asyncio.timeout(2):
            ex = await task
        assert ex.idle and ex.reply is None and ex.lost == {"shell"}


@run_async
async def test_the_watch_runs_while_waiting_and_may_end_the_wait() -> None:
    kernel = FakeKernel()
    async with pumping(kernel) as channels:
        checks = 0

        async def check() -> None:
            nonlocal checks
            checks += 1
            if checks == 3:
                raise KernelDied("gone")

        with pytest.raises(KernelDied):
            async with asyncio.timeout(2):
                await channels.request("execute_request", EXECUTE,
                                       watch=Watch(lambda: 0.02, check))
        assert checks == 3 and channels._routes == {}


@run_async
async def test_a_lingering_request_swallows_its_late_messages() -> None:
    kernel = FakeKernel()
    kernel.on("kernel_info_request", lambda k, req: k.reply(req, channel="control"))
    everyone = Inbox()
    relayed = ("shell", "iopub", "control")
    async with pumping(kernel, channels=relayed, default=everyone) as channels:
        async with asyncio.timeout(2):
            ex = await channels.request("kernel_info_request", {}, channel="control",
                                        until_idle=False, linger=True)
        assert ex.reply is not None
        req = kernel.requests[0][1]
        kernel.status(req, "idle")  # late: the request is over, and not the client's business
        kernel.stream({"header": {"msg_id": "client"}}, "the client's\n")
        await settle()
        assert everyone.texts() == ["the client's\n"]
        assert [t for _, t, _ in everyone.got] == ["stream"]


@run_async
async def test_the_pools_warm_up_waits_for_its_silent_execution_to_end() -> None:
    """pool.warm_up goes through the same primitive: the kernel is idle when it returns, and
    nothing of it is left queued for the session that takes the kernel."""
    done = False

    async def slow(k: FakeKernel, req: dict[str, Any]) -> None:
        nonlocal done
        k.status(req, "busy")
        await asyncio.sleep(0.05)
        k.reply(req)
        await asyncio.sleep(0.05)
        done = True
        k.status(req, "idle")

    kernel = FakeKernel()
    kernel.on("execute_request", slow)
    await warm_up(SimpleNamespace(client=kernel), "pass")  # type: ignore[arg-type]
    assert done
    [(channel, request)] = kernel.requests
    assert channel == "shell" and request["content"]["silent"] is True
    assert all(sock.frames.empty() for sock in (kernel.shell_channel.socket,
                                                kernel.iopub_channel.socket))
