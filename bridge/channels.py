"""One reader per kernel channel, routing each message to its request by ``parent_header.msg_id``,
and the one way the core asks a kernel something: :meth:`Channels.request`.

Runs of a session share the kernel's sockets. Rather than every run polling them (and stealing
each other's messages), one pump per kernel reads its channels and hands each message to the
sink registered for its parent msg_id; a message nobody asked for goes to the ``default`` sink
when there is one (a Jupyter client's relay sees everything), else nowhere.

The kernel is untrusted, so the pump spends nothing on what nobody asked for: it reads the raw
frames (the sockets are bounded by :mod:`bridge.wire`), parses only the small parent header,
and drops messages of no live request (late output of a timed-out run, another client's
traffic, a flood) without checking their signature or decoding their content. An output message
for a run that keeps no more output is counted, not decoded. When a socket's connection is reset
(a message over the size cap), every live request hears of it as a ``RESET`` message.

:meth:`Channels.request` sends a request and waits, under the caller's deadline, for its reply
and (for requests that run code) the kernel's ``idle`` after it, as nbclient's execute loop
does: the reply may come before or after idle; once the reply is in, iopub gets
``iopub_grace`` seconds of silence to bring idle (nbclient's ``iopub_timeout``, though counted
from the last iopub message of the request rather than from the reply, so a long flush of
output is not cut); a channel that lost messages to a reset is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, cast

import zmq
from jupyter_client.adapter import adapt
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.session import DELIM, Session

from .messages import OUTPUT_TYPES, Channel, Message
from .wire import HEADER_CAP, keep_connected

log = logging.getLogger(__name__)

Sink = Callable[[Channel, Message], None]
CHANNELS: tuple[Channel, ...] = ("shell", "iopub", "stdin")
# A message the pump makes up (never a kernel's): the channel's connection was reset, so a
# reply or status may have been lost. Content: {"channel": <channel>}.
RESET = "kb_connection_reset"
# After the reply, how long iopub may stay silent before the idle status is given up for lost
# (nbclient waits ``iopub_timeout``, 4 s, in all).
IOPUB_GRACE_S = 4.0


class OutputBudget(Protocol):
    """What a request that collects output (a run) tells the pump."""

    def output_room(self) -> int:
        """Bytes of output still kept; at 0 or less output is dropped undecoded."""
        ...

    def output_dropped(self, size: int) -> None:
        ...


@dataclass(frozen=True)
class Watch:
    """What a long request does while it waits: every ``every()`` seconds without news,
    ``check()``, which may raise to end the wait (the kernel died)."""

    every: Callable[[], float]
    check: Callable[[], Awaitable[None]]


@dataclass
class Exchange:
    """A request and what came back for it."""

    msg_id: str
    reply: Message | None = None  # None: not awaited, or lost to a reset
    idle: bool = False  # the kernel said idle after it
    lost: set[Channel] = field(default_factory=set)  # channels whose connection was reset

    @property
    def content(self) -> dict[str, Any]:
        """The reply's content; {} without a reply."""
        return dict(self.reply["content"]) if self.reply is not None else {}


@dataclass
class Route:
    sink: Sink
    output: OutputBudget | None = None


def _drop(channel: Channel, msg: Message) -> None:
    pass


class Channels:
    def __init__(self, client: AsyncKernelClient, channels: tuple[Channel, ...] = CHANNELS,
                 default: Sink | None = None, guarded: bool = True) -> None:
        """``default`` gets every message no request claims; ``guarded``: reconnect a socket
        whose connection a message over the size cap reset (bridge.wire)."""
        self.client = client
        self.channels = channels
        self._default = default
        self._guarded = guarded
        self._routes: dict[str, Route] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(ch)) for ch in self.channels]
        if self._guarded:
            self._tasks += [asyncio.create_task(keep_connected(partial(self._socket, ch),
                                                               partial(self._reset, ch)))
                            for ch in self.channels]

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

    async def request(self, msg_type: str, content: dict[str, Any], *,
                      channel: Channel = "shell", until_idle: bool = True,
                      on_message: Sink | None = None, output: OutputBudget | None = None,
                      watch: Watch | None = None, iopub_grace: float | None = IOPUB_GRACE_S,
                      linger: bool = False) -> Exchange:
        """Send a request and wait for its reply on ``channel`` and, ``until_idle``, for the
        kernel's idle after it (see the module doc). Every message of the request, the reply
        included, also goes to ``on_message`` as it comes.

        No deadline of its own: the caller's (``asyncio.timeout``) ends the wait with
        TimeoutError. ``linger``: late messages of the request are swallowed afterwards, not
        handed to the default sink. Raises whatever ``watch.check`` raises.
        """
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        reply_type = msg_type.removesuffix("_request") + "_reply"
        heard = 0.0  # when the reply or the request's last iopub message came

        def sink(ch: Channel, msg: Message) -> None:
            nonlocal heard
            kind = msg["header"].get("msg_type", "")
            # Only what may end the wait wakes the waiter: not every line of a flood.
            if kind == RESET:
                ex.lost.add(ch)
                changed.set()
            elif ch == channel and kind == reply_type:
                ex.reply = msg
                heard = loop.time()
                changed.set()
            elif ch == "iopub":
                heard = loop.time()
                if kind == "status" and msg["content"].get("execution_state") == "idle":
                    ex.idle = True
                    changed.set()
            if on_message is not None:
                on_message(ch, msg)

        def answered() -> bool:
            if not until_idle:
                return ex.reply is not None or channel in ex.lost
            # Both the reply and idle, or one of them when the other's channel lost messages.
            return ((ex.reply is not None or channel in ex.lost)
                    and (ex.idle or "iopub" in ex.lost) and (ex.reply is not None or ex.idle))

        ex = Exchange(self.send(msg_type, content, sink, channel, output))
        try:
            while not answered():
                wait = watch.every() if watch is not None else None
                graced = until_idle and iopub_grace is not None and ex.reply is not None
                if graced:
                    assert iopub_grace is not None
                    left = heard + iopub_grace - loop.time()
                    if left <= 0:
                        break  # the reply is in and iopub went quiet: idle was lost
                    wait = left if wait is None else min(wait, left)
                changed.clear()
                try:
                    # asyncio.timeout, unlike wait_for, costs no extra task on the hot path
                    async with asyncio.timeout(wait):
                        await changed.wait()
                except TimeoutError:
                    if watch is not None:
                        await watch.check()
        finally:
            if linger:
                self._routes[ex.msg_id] = Route(_drop)
            else:
                self.release(ex.msg_id)
        return ex

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
            if self._default is None:
                return  # nobody asked: not verified, not decoded
            route = Route(self._default)
        header = _small_json(parts[1])
        if header is None or len(parts[3]) > HEADER_CAP:
            return
        if route.output is not None and header.get("msg_type") in OUTPUT_TYPES:
            size = sum(len(p) for p in parts[4:])
            if route.output.output_room() <= 0:
                route.output.output_dropped(size)
                return
        route.sink(channel, _decode(client.session, header, parts))


def _after_delimiter(frames: list[zmq.Frame]) -> list[zmq.Frame] | None:
    """The frames after the routing identities; None without a delimiter. Only frames of the
    delimiter's length are compared (jupyter_client's feed_identities copies every frame)."""
    for i, frame in enumerate(frames):
        if len(frame) == len(DELIM) and frame.bytes == DELIM:
            return frames[i + 1:]
    return None


def _decode(session: Session, header: dict[str, Any], parts: list[zmq.Frame]) -> Message:
    """``Session.deserialize(parts, content=True)`` with its checks (signed, by the key, not
    replayed) but without its date parsing: it turns the header's and parent header's ISO
    strings into datetimes with dateutil, a sixth of the server's CPU per query, and nothing
    here reads a message's date (the Jupyter relay serialises either form alike). Raises
    ValueError for a message deserialize would refuse."""
    head = [bytes(p.bytes) for p in parts[:5]]
    if session.auth is not None:
        signature = head[0]
        if not signature:
            raise ValueError("Unsigned Message")
        if signature in session.digest_history:
            raise ValueError(f"Duplicate Signature: {signature!r}")
        session._add_digest(signature)
        if not hmac.compare_digest(signature, session.sign(head[1:5])):
            raise ValueError(f"Invalid Signature: {signature!r}")
    msg: dict[str, Any] = {
        "header": header, "msg_id": header["msg_id"], "msg_type": header["msg_type"],
        "parent_header": session.unpack(head[2]), "metadata": session.unpack(head[3]),
        "content": session.unpack(head[4]),
        "buffers": [memoryview(bytes(p.bytes)) for p in parts[5:]]}
    # Our kernels speak protocol 5; an older one is adapted as deserialize would.
    if not str(header.get("version", "5")).startswith("5"):
        msg = adapt(msg)
    return cast(Message, msg)


def _small_json(frame: zmq.Frame) -> dict[str, Any] | None:
    if len(frame) > HEADER_CAP:
        return None
    value = json.loads(frame.bytes)
    return value if isinstance(value, dict) else None
