"""Unit tests of a Jupyter relay's side of the one channel pump (bridge.gateway): the
connect-time nudges go through the request primitive, and their answers, late ones included,
never reach the client; everything else does."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from bridge import gateway
from bridge.gateway import RELAYED_CHANNELS, Gateway, Relay, until_live
from bridge.messages import Channel, Message

from .fake_kernel import FakeKernel, pumping, run_async, settle
from .sessions_support import make_session


@run_async
async def test_nudges_until_iopub_is_live_and_swallows_every_answer_to_them() -> None:
    nudges = 0

    def nudged(k: FakeKernel, req: dict[str, Any]) -> None:
        nonlocal nudges
        nudges += 1
        k.reply(req, channel="control")
        if nudges >= 2:  # the first nudge's statuses were published before we subscribed
            k.status(req, "busy")
            k.status(req, "idle")

    kernel = FakeKernel()
    kernel.on("kernel_info_request", nudged)
    seen: list[tuple[Channel, str]] = []
    gateway.NUDGE_S = 0.05
    try:
        async with pumping(kernel, channels=RELAYED_CHANNELS,
                           default=lambda ch, m: seen.append((ch, m["header"]["msg_type"]))
                           ) as channels:
            async with asyncio.timeout(5):
                assert await until_live(channels, timeout=5)
            first = kernel.requests[0][1]
            kernel.status(first, "idle")  # late, and not the client's business
            kernel.stream({"header": {"msg_id": "a-cell"}}, "the client's\n")
            await settle()
    finally:
        gateway.NUDGE_S = 0.3
    assert nudges == 2
    assert seen == [("iopub", "stream")]


@run_async
async def test_a_kernel_that_never_answers_is_given_up_on() -> None:
    kernel = FakeKernel()  # no script: nudges go unanswered
    async with pumping(kernel, channels=RELAYED_CHANNELS) as channels:
        assert not await until_live(channels, timeout=0.5)
    assert len(kernel.requests) >= 2  # nudged again, not waited on once


def test_the_relay_delivers_observes_and_closes_when_its_client_is_gone() -> None:
    async def go() -> tuple[list[str], Any, bool]:
        gw = Gateway(SimpleNamespace(on_terminated=[]), None)  # type: ignore[arg-type]
        session = make_session()
        got: list[str] = []
        closed = asyncio.Event()

        def deliver(channel: Channel, msg: Message) -> None:
            if msg["content"].get("text") == "boom\n":
                raise ConnectionError("the client is gone")
            got.append(f"{channel}:{msg['header'].get('msg_type')}")

        relay = Relay(gw, session, deliver, closed.set)
        kernel = FakeKernel()
        async with pumping(kernel, channels=RELAYED_CHANNELS, default=relay._receive) as ch:
            relay._channels = ch
            gw.sent(session, "cell")
            kernel.status({"header": {"msg_id": "cell"}}, "busy")
            kernel.stream({"header": {"msg_id": "cell"}}, "out\n")
            await settle()
            busy = session.busy  # a client's cell holds the session
            kernel.stream({"header": {"msg_id": "cell"}}, "boom\n")
            async with asyncio.timeout(2):
                await closed.wait()
        return got, busy, relay._channels is None

    got, busy, closed = asyncio.run(go())
    assert got == ["iopub:status", "iopub:stream"] and busy and closed
