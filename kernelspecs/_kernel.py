"""Base class of kernel-bridge's process kernels (bash, C, C++, Go, Rust, Java).

Wire contract the server relies on (keep in sync with the bridge's language table):

* ``execute_reply`` always carries ``"exit_code": int`` (signals as 128 + n),
  and ``"signal": n`` when a signal ended the cell's command.
  0 gives ``status: "ok"``; anything else gives ``status: "error"``,
  ``ename: "ExitCode"``, ``evalue: str(exit_code)``, ``traceback: []`` plus the
  same content as an iopub ``error`` message.  The exit itself adds no text to
  stdout or stderr.  An interrupted cell also has ``"interrupted": true``.
* Output is iopub ``stream`` messages, ``stdout`` and ``stderr`` kept apart.
* A program blocked reading stdin triggers an ``input_request`` (empty prompt:
  the program's own prompt has already been streamed) when the request had
  ``allow_stdin``; otherwise its stdin is closed so it reads end-of-file.  The
  answer is written to the program's stdin followed by ``"\\n"``; the answer
  ``"\\x04"`` closes stdin instead.
* ``interrupt_mode: "message"``: an ``interrupt_request`` on the control
  channel SIGINTs the running command's process group, then SIGKILLs it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Final

from ipykernel.kernelapp import IPKernelApp
from jupyter_client.session import Session

from . import KERNEL_VERSION
from ._abort import AbortBeforeReply
from ._frontend import ask_frontend
from ._subproc import CommandRun, OutputSink, RunResult, StreamName

INTERRUPTED: Final = RunResult(exit_code=130, interrupted=True)


@dataclass(frozen=True)
class _Cell:
    """What the runner needs from the execute_request being served."""

    parent: dict[str, Any]
    ident: Any
    silent: bool
    allow_stdin: bool


class ProcessKernel(AbortBeforeReply):
    """Runs each cell as one or more subprocesses; subclasses say which."""

    implementation = "kernel-bridge"
    implementation_version = KERNEL_VERSION

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._cell: _Cell | None = None
        # Read by interrupt_request on the control thread; plain attribute
        # reads and writes are atomic under the GIL, which is all we need.
        self._running: CommandRun | None = None
        self._interrupt_requested = False
        # Extra execute_reply fields a subclass sets while running a cell.
        self.reply_extra: dict[str, Any] = {}

    @property
    def _wire(self) -> Session:
        # IPKernelApp sets the session before any message can arrive.
        if self.session is None:
            raise RuntimeError("expected a session, got none")
        return self.session

    @property
    def kernel_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().kernel_info
        # Cells share one runner, so concurrent subshells are not supported,
        # and there is no debugger behind these languages.
        info["supported_features"] = []
        return info

    # -- to be provided by subclasses -------------------------------------

    async def run_cell(self, code: str) -> RunResult:
        """Run one cell with ``run_command``/``write``; return its outcome."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # Python programs started from a cell should stream, not buffer.
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra or {})
        return env

    def write(self, name: StreamName, text: str) -> None:
        """Publish text on iopub as the current cell's stdout or stderr."""
        cell = self._cell
        if cell is None or cell.silent or not text:
            return
        self._wire.send(
            self.iopub_socket,
            "stream",
            {"name": name, "text": text},
            cell.parent,
            ident=self._topic("stream"),  # type: ignore[no-untyped-call]
        )

    async def run_command(
        self,
        script: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bool = True,
        on_output: OutputSink | None = None,
    ) -> RunResult:
        """Run ``bash -c script`` for the current cell, interruptibly.

        Output goes to the cell's streams, or to ``on_output`` when given.
        """
        cell = self._cell
        if cell is None:
            raise RuntimeError("expected a cell in progress, got none")
        if self._interrupt_requested:
            return INTERRUPTED  # interrupted between two steps of the cell
        run = CommandRun(
            script,
            cwd=cwd,
            env=env if env is not None else self.child_env(),
            on_output=on_output or self.write,
            ask_input=self._ask_frontend if stdin and cell.allow_stdin else None,
        )
        self._running = run
        try:
            result = await run.run()
        finally:
            self._running = None
        if self._interrupt_requested and not result.interrupted:
            return RunResult(exit_code=result.exit_code, interrupted=True, signal=result.signal)
        return result

    # -- Kernel overrides -------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        cell = _Cell(
            parent=self.get_parent("shell"),  # type: ignore[no-untyped-call]
            ident=self._parent_ident["shell"],
            silent=silent,
            allow_stdin=allow_stdin,
        )
        self._cell = cell
        self._interrupt_requested = False
        self.reply_extra = {}
        try:
            result = await self.run_cell(code)
        finally:
            self._cell = None
        return self._reply(result, cell)

    def _reply(self, result: RunResult, cell: _Cell) -> dict[str, Any]:
        content: dict[str, Any] = {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": {},
            **self.reply_extra,
            "exit_code": result.exit_code,
        }
        if result.interrupted:
            content["interrupted"] = True
        if result.signal is not None:
            content["signal"] = result.signal
        if result.exit_code != 0:
            error = {"ename": "ExitCode", "evalue": str(result.exit_code), "traceback": []}
            content.update(status="error", **error)
            if not cell.silent:
                self._wire.send(
                    self.iopub_socket,
                    "error",
                    error,
                    cell.parent,
                    ident=self._topic("error"),  # type: ignore[no-untyped-call]
                )
        return content

    async def interrupt_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        # Runs on the control thread while the shell thread awaits the program.
        # The base class would SIGINT the kernel itself; we stop the program.
        if self._cell is not None:
            self._interrupt_requested = True
        run = self._running
        if run is not None:
            run.interrupt()
        self._wire.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        run = self._running
        if run is not None:
            run.kill()
        return {"status": "ok", "restart": restart}

    async def _ask_frontend(self) -> str | None:
        cell = self._cell
        if cell is None:
            return None
        return await ask_frontend(self._wire, self.stdin_socket, cell.parent, cell.ident)


def launch(kernel_class: type[ProcessKernel], argv: list[str] | None = None) -> None:
    """Start ``kernel_class`` as a Jupyter kernel (``-f connection_file`` in argv)."""
    IPKernelApp.launch_instance(
        argv=argv if argv is not None else sys.argv[1:], kernel_class=kernel_class
    )
