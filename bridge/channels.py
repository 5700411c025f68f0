"""One reader per kernel channel, routing each message to its request by ``parent_header.msg_id``.

Runs of a session share the kernel's sockets. Rather than every run polling them (and stealing
each other's messages), one pump per kernel reads shell, iopub and stdin and hands each message to
the sink registered for its parent msg_id; messages of no live request (late output of a timed-out
run, another client's traffic) are dropped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

from .messages import Channel, Message

log = logging.getLogger(__name__)

Sink = Callable[[Channel, Message], None]


class Channels:
    def __init__(self, client: AsyncKernelClient) -> None:
        self.client = client
        self._sinks: dict[str, Sink] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pump("shell")),
            asyncio.create_task(self._pump("iopub")),
            asyncio.create_task(self._pump("stdin")),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def rebind(self, client: AsyncKernelClient) -> None:
        """After a kernel restart the manager hands out a new client."""
        self.client = client

    def send(self, msg_type: str, content: dict[str, Any], sink: Sink,
             channel: Channel = "shell") -> str:
        """Send a request and route every message that answers it to ``sink``; returns msg_id."""
        msg = self.client.session.msg(msg_type, content)
        msg_id = str(msg["header"]["msg_id"])
        self._sinks[msg_id] = sink
        getattr(self.client, f"{channel}_channel").send(msg)
        return msg_id

    def release(self, msg_id: str) -> None:
        self._sinks.pop(msg_id, None)

    def reply_input(self, value: str) -> None:
        self.client.input(value)

    async def _pump(self, channel: Channel) -> None:
        while True:
            try:
                # Looked up each time: a restart replaces the client and its sockets.
                msg: Message = await getattr(self.client, f"get_{channel}_msg")()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.05)
                continue
            parent = msg.get("parent_header") or {}
            sink = self._sinks.get(str(parent.get("msg_id", "")))
            if sink is not None:
                sink(channel, msg)
