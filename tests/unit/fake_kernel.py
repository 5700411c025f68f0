"""A scripted kernel for unit tests: the client side of its sockets, fed real Jupyter messages.

:class:`FakeKernel` stands where a jupyter_client ``AsyncKernelClient`` stands for
:class:`bridge.channels.Channels`: it has a real ``Session`` (messages are signed and serialized
to frames as a kernel would), channels whose ``send`` hands the request to a script, and sockets
whose ``recv_multipart`` gives the frames the script emitted. Nothing of the core is mocked:
the pump, the routing, the signature check and everything above them run as in production.

    kernel = FakeKernel()
    kernel.on("execute_request", lambda k, req: k.finish(req, stdout="hi\\n"))
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import zmq
from jupyter_client.session import Session

from bridge.channels import Channels
from bridge.runs import Liveness

Script = Callable[["FakeKernel", dict[str, Any]], Awaitable[None] | None]


class FakeSocket:
    def __init__(self) -> None:
        self.frames: asyncio.Queue[list[zmq.Frame]] = asyncio.Queue()
        self.closed = False

    async def recv_multipart(self, copy: bool = False) -> list[zmq.Frame]:
        return await self.frames.get()


class FakeChannel:
    def __init__(self, kernel: FakeKernel, name: str) -> None:
        self.kernel = kernel
        self.name = name
        self.socket = FakeSocket()

    def send(self, msg: dict[str, Any]) -> None:
        self.kernel.received(self.name, msg)


class FakeKernel:
    def __init__(self) -> None:
        self.session = Session(key=b"fake-kernel-key")
        self._kernel_session = Session(key=b"fake-kernel-key")  # the kernel's own end
        for name in ("shell", "iopub", "stdin", "control"):
            setattr(self, f"{name}_channel", FakeChannel(self, name))
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.inputs: list[str] = []
        self.alive = True
        self.stopped = False
        self.interrupts = 0
        self._scripts: dict[str, Script] = {}
        self._on_input: Callable[[str], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the script ---------------------------------------------------------------------------

    def on(self, msg_type: str, script: Script) -> None:
        """Answer requests of ``msg_type`` with ``script(kernel, request)`` (may be async)."""
        self._scripts[msg_type] = script

    def received(self, channel: str, msg: dict[str, Any]) -> None:
        self.requests.append((channel, msg))
        script = self._scripts.get(msg["header"]["msg_type"])
        if script is None:
            return
        result = script(self, msg)
        if result is not None:
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def stop_channels(self) -> None:
        """The client's sockets closed (jupyter_client's KernelClient.stop_channels)."""
        self.stopped = True

    def input(self, value: str) -> None:
        """The client's ``input_reply`` (what Channels.reply_input calls)."""
        self.inputs.append(value)
        if self._on_input is not None:
            self._on_input(value)

    def expect_input(self, handler: Callable[[str], None]) -> None:
        self._on_input = handler

    # -- what the kernel sends ------------------------------------------------------------------

    def emit(self, channel: str, msg_type: str, content: dict[str, Any],
             parent: dict[str, Any] | None = None, *, forged: bool = False) -> None:
        """Put one signed message on ``channel``'s socket, in reply to ``parent``."""
        session = Session(key=b"someone-else") if forged else self._kernel_session
        msg = session.msg(msg_type, content, parent=parent or {})
        frames = session.serialize(msg)
        getattr(self, f"{channel}_channel").socket.frames.put_nowait(
            [zmq.Frame(f) for f in frames])

    def status(self, parent: dict[str, Any] | None, state: str) -> None:
        self.emit("iopub", "status", {"execution_state": state}, parent)

    def stream(self, parent: dict[str, Any] | None, text: str, name: str = "stdout") -> None:
        self.emit("iopub", "stream", {"name": name, "text": text}, parent)

    def reply(self, parent: dict[str, Any], channel: str = "shell", **content: Any) -> None:
        msg_type = parent["header"]["msg_type"].removesuffix("_request") + "_reply"
        self.emit(channel, msg_type, {"status": "ok", **content}, parent)

    def finish(self, parent: dict[str, Any], *, stdout: str = "", **reply: Any) -> None:
        """A whole execution, in the order ipykernel sends it: busy, output, reply, idle."""
        self.status(parent, "busy")
        if stdout:
            self.stream(parent, stdout)
        if reply.get("status") == "error":
            self.emit("iopub", "error", {k: reply[k] for k in ("ename", "evalue", "traceback")
                                         if k in reply}, parent)
        self.reply(parent, **reply)
        self.status(parent, "idle")

    def raised(self, parent: dict[str, Any], ename: str, evalue: str = "") -> None:
        """An execution whose code raised ``ename(evalue)``."""
        self.finish(parent, status="error", ename=ename, evalue=evalue,
                    traceback=[f"\x1b[31m{ename}\x1b[0m: {evalue}"])

    # -- as a run's target ------------------------------------------------------------------------

    async def is_alive(self) -> bool:
        return self.alive

    async def interrupt(self) -> None:
        self.interrupts += 1


@contextlib.asynccontextmanager
async def pumping(kernel: FakeKernel, **kwargs: Any) -> AsyncIterator[Channels]:
    """Channels pumping ``kernel``'s sockets while the block runs."""
    channels = Channels(kernel, guarded=False, **kwargs)  # type: ignore[arg-type]
    channels.start()
    try:
        yield channels
    finally:
        await channels.stop()


def target(kernel: FakeKernel, channels: Channels) -> Liveness:
    return Liveness(channels, kernel.is_alive, kernel.interrupt)


async def settle(times: int = 5) -> None:
    """Let the pumps route what is queued."""
    for _ in range(times):
        await asyncio.sleep(0)


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A coroutine test run on its own event loop (the project has no asyncio plugin)."""
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run
