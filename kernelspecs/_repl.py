"""Base for kernels backed by one long-lived, stateful interpreter (the "host").

The host (``js_host.js``, ``rb_host.rb``) reads JSON-line commands from fd
``$KB_CMD_FD`` and writes JSON-line events to fd ``$KB_EVENT_FD``; its real
stdout/stderr carry only user output, attributed to the running cell.

    kernel -> host  {"op": "execute" | "complete", "id", "code", ["cursor_pos"]}
    host -> kernel  {"ev": "ready"}  {"ev": "result", "id", "text"}
                    {"ev": "done", "id", "exit_code"}
                    {"ev": "error", "id", "ename", "evalue", "traceback"}
                    {"ev": "complete_reply", "id", "matches", "start", "end"}

execute_reply carries ``exit_code``: 0 ok, 1 uncaught error, 130 interrupted (plus
``"interrupted": true``), n for exit(n). A host that dies is restarted for the next
cell and the loss of state is announced on stderr.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from typing import Any, ClassVar

from ._abort import AbortBeforeReply
from ._frontend import ask_frontend
from ._host import HostProcess, Item

INTERRUPTED = 130
# How long a host may take to honour SIGINT before we kill and restart it.
END_MARKER_GRACE_S = 2.0  # how long a finished cell waits for its end markers
INTERRUPT_GRACE_S = 3.0
PROTOCOL_VERSION = "5.3"


class ReplKernel(AbortBeforeReply):
    """Runs each cell in a persistent host process; subclasses name the runtime."""

    runtime: ClassVar[str]  # executable looked up on PATH, e.g. "node"
    host_script: ClassVar[str]  # file next to this module
    host_args: ClassVar[tuple[str, ...]] = ()
    protocol_version = PROTOCOL_VERSION

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._cell_seq = 0
        self._running: int | None = None  # read by the control thread on interrupt
        self._interrupted_cell: int | None = None
        self._asker: tuple[dict[str, Any], Any] | None = None
        self._answering: asyncio.Task[None] | None = None
        # Spawn now so the first cell does not pay the interpreter's start-up.
        self._host: HostProcess = self._spawn()

    @classmethod
    def host_argv(cls) -> list[str]:
        exe = shutil.which(cls.runtime)
        if exe is None:
            raise RuntimeError(f"{cls.runtime!r} not found on PATH")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), cls.host_script)
        return [exe, *cls.host_args, script]

    def _spawn(self) -> HostProcess:
        return HostProcess(self.host_argv())

    # -- execution ----------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        **_: Any,
    ) -> dict[str, Any]:
        host = await self._live_host(silent)
        self._cell_seq += 1
        cell = self._cell_seq
        self._running = cell
        # Where an input request of this cell goes (None: the program reads end-of-file).
        self._asker = (
            (self.get_parent("shell"), self._parent_ident["shell"])  # type: ignore[no-untyped-call]
            if allow_stdin
            else None
        )
        try:
            host.send({"op": "execute", "id": cell, "code": code})
            error, exit_code = await self._collect(host, cell, silent)
        finally:
            self._running = None
            if self._answering is not None:
                self._answering.cancel()
                self._answering = None
        reply: dict[str, Any] = {
            "status": "ok" if error is None else "error",
            "execution_count": self.execution_count,
            "exit_code": exit_code,
        }
        if error is None:
            reply.update(payload=[], user_expressions={})
        else:
            reply.update(error)
        if exit_code == INTERRUPTED and self._interrupted_cell == cell:
            reply["interrupted"] = True  # as kernel-bridge's process kernels report it
        return reply

    async def _live_host(self, silent: bool) -> HostProcess:
        host = self._host
        host.attach(asyncio.get_running_loop())
        if host.returncode is None:
            return host
        # The host died between cells (a timer called exit, or it was killed):
        # show what it left behind, then start afresh.
        while not host.queue.empty():
            item = host.queue.get_nowait()
            self._stream(item.name, item.text, silent)  # only streams have text
        self._stream("stderr", self._restart_note(host.returncode), silent)
        return self._restart()

    def _restart(self) -> HostProcess:
        self._host = self._spawn()
        self._host.attach(asyncio.get_running_loop())
        return self._host

    def _restart_note(self, returncode: int) -> str:
        return (
            f"[kernel-bridge] {self.runtime} exited with code {returncode}; "
            "restarted it, variables from earlier cells are lost\n"
        )

    async def _collect(
        self, host: HostProcess, cell: int, silent: bool
    ) -> tuple[dict[str, Any] | None, int]:
        """Publish the cell's output until it is done; return (error content, exit code)."""
        error: dict[str, Any] | None = None
        deadline: float | None = None
        finished: tuple[dict[str, Any] | None, int] | None = None  # "done" seen, markers not
        # Before each event that must follow the cell's output so far ("input_request",
        # "done"), the host writes a marker on stdout and stderr; an event takes effect once
        # both streams have shown as many markers as there were such events.
        marks = {"stdout": 0, "stderr": 0}
        syncs = 0
        asks: list[int] = []  # sync numbers of input requests not yet passed on
        while True:
            if self._interrupted_cell == cell and deadline is None:
                deadline = time.monotonic() + INTERRUPT_GRACE_S
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if finished is not None:  # user code may have closed its stdout: don't hang
                    timeout = min(timeout or END_MARKER_GRACE_S, END_MARKER_GRACE_S)
                item = await asyncio.wait_for(host.queue.get(), timeout)
            except TimeoutError:
                if finished is not None:
                    return finished
                # The host ignored SIGINT (e.g. blocked in native code): kill it and
                # keep reading until its "exited" item, which restarts it.
                host.kill()
                deadline = float("inf")
                trace = ["KeyboardInterrupt: the host ignored SIGINT and was killed"]
                error = error or self._error("KeyboardInterrupt", "interrupted", trace, silent)
                continue
            if item.kind == "stream":
                self._stream(item.name, item.text, silent)
            elif item.kind == "end":
                if item.code == cell:
                    marks[item.name] += 1
                seen = min(marks.values())
                while asks and asks[0] <= seen:
                    asks.pop(0)
                    self._answer_input(host, cell)
                if finished is not None and seen >= syncs:
                    return finished
            elif item.kind == "exited":
                self._stream("stderr", self._restart_note(item.code), silent)
                self._restart()
                if deadline == float("inf"):
                    return error, INTERRUPTED
                if item.code == 0:
                    return error, 1 if error else 0
                if error is None:
                    error = self._error("ExitCode", str(item.code), [], silent)
                return error, item.code
            elif item.kind == "event" and item.event is not None:
                event = item.event
                if event.get("id") != cell:
                    continue  # a late event of an earlier, interrupted cell
                if event["ev"] == "result" and not silent:
                    self._publish(
                        "execute_result",
                        {
                            "execution_count": self.execution_count,
                            "data": {"text/plain": event["text"]},
                            "metadata": {},
                        },
                    )
                elif event["ev"] == "error" and error is None:
                    error = self._error(event["ename"], event["evalue"], event["traceback"], silent)
                elif event["ev"] == "input_request":
                    syncs += 1
                    if min(marks.values()) >= syncs:
                        self._answer_input(host, cell)
                    else:
                        asks.append(syncs)
                elif event["ev"] == "done":
                    exit_code = int(event["exit_code"])
                    if exit_code != 0 and error is None:
                        # An explicit exit(n) that the host survived (Ruby's SystemExit).
                        error = self._error("ExitCode", str(exit_code), [], silent)
                    finished = (error, exit_code)
                    syncs += 1
                    if min(marks.values()) >= syncs:
                        return finished
            # "wake": an interrupt arrived; the loop head arms the deadline.

    def _answer_input(self, host: HostProcess, cell: int) -> None:
        """Pass the host's request for a line to the frontend; its answer (None: end-of-file)
        goes back as an ``input_reply`` command."""

        async def answer() -> None:
            value = None
            if self._asker is not None and self.session is not None:
                parent, ident = self._asker
                value = await ask_frontend(self.session, self.stdin_socket, parent, ident)
            host.send({"op": "input_reply", "id": cell, "value": value})

        self._answering = asyncio.get_running_loop().create_task(answer())

    def _error(self, ename: str, evalue: str, traceback: list[str], silent: bool) -> dict[str, Any]:
        # ExitCode errors have an empty traceback, like the process kernels' ones.
        content = {"ename": ename, "evalue": evalue, "traceback": traceback}
        if not silent:
            self._publish("error", content)
        return content

    def _stream(self, name: str, text: str, silent: bool) -> None:
        if not silent and text:
            self._publish("stream", {"name": name, "text": text})

    def _publish(self, msg_type: str, content: dict[str, Any]) -> None:
        self.send_response(self.iopub_socket, msg_type, content)  # type: ignore[no-untyped-call]

    # -- interrupt, completion, shutdown -------------------------------------------

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        # Runs on the control thread. ipykernel's default signals our own process
        # group; only the host's group (the host and its children) should get SIGINT.
        cell = self._running
        if cell is not None:
            self._interrupted_cell = cell
            self._host.interrupt()
        if self.session:
            self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        reply: dict[str, Any] = {"status": "ok", "matches": [], "metadata": {}}
        reply.update(cursor_start=cursor_pos, cursor_end=cursor_pos)
        host = self._host
        host.attach(asyncio.get_running_loop())
        if host.returncode is not None:
            return reply
        self._cell_seq += 1
        request = self._cell_seq
        host.send({"op": "complete", "id": request, "code": code, "cursor_pos": cursor_pos})
        held: list[Item] = []  # output of timers etc.; it belongs to the next cell
        try:
            async with asyncio.timeout(5):
                while True:
                    item = await host.queue.get()
                    event = item.event or {}
                    if item.kind == "event" and event.get("id") == request:
                        reply.update(matches=event["matches"], cursor_start=event["start"])
                        reply.update(cursor_end=event["end"])
                        break
                    held.append(item)
                    if item.kind == "exited":
                        break
        except TimeoutError:
            pass
        for item in held:
            host.queue.put_nowait(item)
        return reply

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        await self._host.stop()
        return {"status": "ok", "restart": restart}


def runtime_version(runtime: str, *args: str) -> str:
    """What ``runtime *args`` prints, for language_info; "" if it cannot run."""
    exe = shutil.which(runtime)
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().lstrip("v")


def launch(kernel_class: type[ReplKernel]) -> None:
    """Entry point of ``python -m kernelspecs.<module> -f {connection_file}``."""
    if shutil.which(kernel_class.runtime) is None:
        # Fail before the kernel binds its ports, with a message the server can show.
        print(
            f"{kernel_class.implementation}: the {kernel_class.runtime!r} executable was not "
            f"found on PATH ({os.environ.get('PATH', '')}); install it to use this kernel",
            file=sys.stderr,
        )
        sys.exit(1)
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(kernel_class=kernel_class)
