"""One reader per kernel channel, routing each message to its request by ``parent_header.msg_id``.

Runs of a session share the kernel's sockets. Rather than every run polling them (and stealing
each other's messages), one pump per kernel reads shell, iopub and stdin and hands each message to
the sink registered for its parent msg_id.

The kernel is untrusted, so the pump spends nothing on what nobody asked for: it reads the raw
frames (the sockets are bounded by :mod:`bridge.wire`), parses only the small parent header,
and drops messages of no live request (late output of a timed-out run, another client's
traffic, a flood) without checking their signature or decoding their content. An output message
for a run that keeps no more output is counted, not decoded. When a socket's connection is reset
(a message over the size cap), every live request hears of it as a ``RESET`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.session import DELIM

from .messages import OUTPUT_TYPES, Channel, Message
from .wire import HEADER_CAP, keep_connected

log = logging.getLogger(__name__)

Sink = Callable[[Channel, Message], None]
CHANNELS: tuple[Channel, ...] = ("shell", "iopub", "stdin")
# A message the pump makes up (never a kernel's): the channel's connection was reset, so a
# reply or status may have been lost. Content: {"channel": <channel>}.
RESET = "kb_connection_reset"


class OutputBudget(Protocol):
    """What a request that collects output (a run) tells the pump."""

    def output_room(self) -> int:
        """Bytes of output still kept; at 0 or less output is dropped undecoded."""
        ...

    def output_dropped(self, size: int) -> None:
        ...


@dataclass
class Route:
    sink: Sink
    output: OutputBudget | None = None


class Channels:
    def __init__(self, client: AsyncKernelClient) -> None:
        self.client = client
        self._routes: dict[str, Route] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(ch)) for ch in CHANNELS]
        self._tasks += [asyncio.create_task(keep_connected(partial(self._socket, ch),
                                                           partial(self._reset, ch)))
                        for ch in CHANNELS]

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
             channel: Channel = "shell", output: OutputBudget | None = None) -> str:
        """Send a request and route every message that answers it to ``sink``; returns msg_id."""
        msg = self.client.session.msg(msg_type, content)
        msg_id = str(msg["header"]["msg_id"])
        self._routes[msg_id] = Route(sink, output)
        getattr(self.client, f"{channel}_channel").send(msg)
        return msg_id

    def release(self, msg_id: str) -> None:
        self._routes.pop(msg_id, None)

    def reply_input(self, value: str) -> None:
        self.client.input(value)

    # -- reading ------------------------------------------------------------------------------

    def _socket(self, channel: Channel) -> Any:
        # Looked up each time: a restart replaces the client and its sockets.
        return getattr(self.client, f"{channel}_channel").socket

    def _reset(self, channel: Channel) -> None:
        notice: Message = {"header": {"msg_type": RESET}, "parent_header": {}, "metadata": {},
                           "content": {"channel": channel}, "msg_type": RESET}
        for route in list(self._routes.values()):
            with contextlib.suppress(Exception):
                route.sink(channel, notice)

    async def _pump(self, channel: Channel) -> None:
        while True:
            try:
                client = self.client
                frames = await self._socket(channel).recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.05)
                continue
            try:
                self._route(channel, client, frames)
            except Exception as exc:  # a malformed or forged message: drop it, go on
                log.debug("dropped a malformed %s message: %s", channel, exc)

    def _route(self, channel: Channel, client: AsyncKernelClient, frames: list[zmq.Frame]) -> None:
        parts = _after_delimiter(frames)
        if parts is None or len(parts) < 5:
            return
        parent = _small_json(parts[2])
        route = self._routes.get(str(parent.get("msg_id", ""))) if parent else None
        if route is None:
            return  # nobody asked: not verified, not decoded
        header = _small_json(parts[1])
        if header is None or len(parts[3]) > HEADER_CAP:
            return
        if route.output is not None and header.get("msg_type") in OUTPUT_TYPES:
            size = sum(len(p) for p in parts[4:])
            if route.output.output_room() <= 0:
                route.output.output_dropped(size)
                return
        msg: Message = client.session.deserialize(parts, content=True, copy=False)
        route.sink(channel, msg)


def _after_delimiter(frames: list[zmq.Frame]) -> list[zmq.Frame] | None:
    """The frames after the routing identities; None without a delimiter. Only frames of the
    delimiter's length are compared (jupyter_client's feed_identities copies every frame)."""
    for i, frame in enumerate(frames):
        if len(frame) == len(DELIM) and frame.bytes == DELIM:
            return frames[i + 1:]
    return None


def _small_json(frame: zmq.Frame) -> dict[str, Any] | None:
    if len(frame) > HEADER_CAP:
        return None
    value = json.loads(frame.bytes)
    return value if isinstance(value, dict) else None
