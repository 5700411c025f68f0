"""The run state machine: one execution in a session, from queued to a terminal state.

A run's producer (its program: a query, or batch steps) sends requests to kernels through
:class:`~bridge.channels.Channels` and turns the answers into console items and *marks*
(``clean-finished``, ``build-finished``, ``waiting-input``, ``finished``, ``exec-timeout``). Its
consumer (a dialect) pulls :class:`Result` slices with :meth:`Run.next_result`: everything up to
the next mark, or what came within the flush interval (``continued``). One deadline covers the
whole run.

    QUEUED → RUNNING ⇄ WAITING_INPUT
               │
               ├→ FINISHED      (program ended; exit code by its kind's rule)
               ├→ TIMED_OUT     (deadline passed)
               ├→ FAILED        (kernel died or unreachable, or its program could not start)
               └→ CANCELLED     (session closed before the run started)

The states, exit codes and texts are :mod:`bridge.outcomes`'; the transitions are here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .channels import RESET, Watch
from .console import ConsoleItem, from_message, merge
from .errors import BridgeError, InvalidTransition, KernelDied
from .messages import OUTPUT_TYPES, Channel, Message
from .outcomes import (
    KERNEL_DIED,
    KILLED_EXIT_CODE,
    NOT_STARTED_EXIT_CODE,
    ExitRule,
    StepOutcome,
)
from .outcomes import RunState as RunState  # the one RunState, also importable from here
from .tasks import spawn
from .wire import RESET_NOTICE

if TYPE_CHECKING:
    from .channels import Channels

LIVENESS_INTERVAL = 0.5
CAP_CHECK_INTERVAL = 0.05  # how soon a run whose output passed its cap interrupts the kernel
# Output already in flight keeps arriving after an interrupt; a second SIGINT while ipykernel is
# still unwinding the first (formatting its traceback) can land in its own code and kill the
# kernel, so interrupt again only while no reply has come and output still flows this long after
# the last interrupt (code that catches KeyboardInterrupt and goes on printing).
REINTERRUPT_AFTER_S = 5.0
INPUT_SETTLE_S = 0.02
RESET_SETTLE_S = 0.2  # after a reset, how long a dying kernel takes to be seen dead


@dataclass(frozen=True)
class Mark:
    status: str
    exit_code: int | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class Result:
    run_id: str
    status: str
    exit_code: int | None
    options: dict[str, Any] | None
    console: list[ConsoleItem]


@dataclass
class Liveness:
    """What a step needs to know about the kernel it talks to."""

    channels: Channels
    is_alive: Callable[[], Awaitable[bool]]
    # Stops the code running on the kernel (as Ctrl-C); a run whose output passed its cap uses it
    interrupt: Callable[[], Awaitable[None]] | None = None


Program = Callable[["Run"], Awaitable[None]]
# Told of a run's events as they happen: ("stdout" | "stderr", {"text"}), ("status", {...}),
# ("end", {...}). Observers must not block (bridge.events buffers and persists).
Observer = Callable[[str, dict[str, Any]], None]
StreamSink = Callable[[str, str], None]


@dataclass(eq=False)
class Run:
    run_id: str
    mode: str
    code: str
    program: Program
    options: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None  # seconds for the whole run; None: no limit
    stdin: str | None = None  # preset input (one-shot dialects); None: ask the client
    output_limit: int = 4 * 1024 * 1024

    state: RunState = RunState.QUEUED
    exit_code: int | None = None
    outcome: StepOutcome | None = None  # the reply of the step that gave the exit code
    error: str | None = None  # what ended it when it did not finish (also on its stderr)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        self._records: deque[ConsoleItem | Mark] = deque()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._transcript: list[ConsoleItem] = []
        self._bytes = 0
        self._dropped = 0
        self._interrupted_at = 0  # self._dropped when the kernel was last interrupted
        self._interrupt_time = 0.0  # time.monotonic() of that interrupt
        self._deadline: float | None = None
        self._waiting: Liveness | None = None
        self._stdin_lines = deque(self.stdin.splitlines()) if self.stdin is not None else None
        self.observers: list[Observer] = []

    def notify(self, event: str, data: dict[str, Any]) -> None:
        """Tell the observers (event streams) of an event of this run."""
        for observer in self.observers:
            observer(event, data)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    # -- consumer side -------------------------------------------------------------------------

    async def next_result(self, flush: float) -> Result:
        """Everything up to the next mark, or what arrived within ``flush`` seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + flush
        items: list[ConsoleItem] = []
        while True:
            while self._records:
                rec = self._records.popleft()
                if isinstance(rec, Mark):
                    return Result(self.run_id, rec.status, rec.exit_code, rec.options,
                                  merge(items))
                items.append(rec)
            remaining = until - loop.time()
            if remaining <= 0:
                return Result(self.run_id, "continued", None, None, merge(items))
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def feed_input(self, text: str) -> None:
        """Answer the pending input request. Raises InvalidTransition."""
        if self.state is not RunState.WAITING_INPUT or self._waiting is None:
            raise InvalidTransition(f"run {self.run_id}", RunState.WAITING_INPUT.value,
                                    self.state.value)
        self.state = RunState.RUNNING
        self.notify("status", {"status": RunState.RUNNING.value})
        self._waiting.channels.reply_input(text)
        self._waiting = None

    async def wait(self) -> None:
        await self._done.wait()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def exhausted(self) -> bool:
        """Ended, and its last result has been read: nothing more to continue."""
        return self.done and not self._records

    def text(self, stream: str) -> str:
        return "".join(v for k, v in self._transcript if k == stream)

    @property
    def truncated(self) -> bool:
        """Output passed ``output_limit``: some was dropped (and the run was interrupted)."""
        return self._dropped > 0

    # -- producer side -------------------------------------------------------------------------

    async def execute(self) -> None:
        """Run the program under the run's one deadline; always ends in a terminal state."""
        if self.state is not RunState.QUEUED:
            raise InvalidTransition(f"run {self.run_id}", RunState.QUEUED.value,
                                    self.state.value)
        self.state = RunState.RUNNING
        self.started_at = time.time()
        self.notify("status", {"status": RunState.RUNNING.value})
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.timeout if self.timeout else None
        try:
            async with asyncio.timeout_at(self._deadline):
                await self.program(self)
            if not self.state.terminal:
                self.finish(0)
        except TimeoutError:
            self._end(RunState.TIMED_OUT, Mark("exec-timeout"))
        except KernelDied as exc:
            self._fail(exc.message, KILLED_EXIT_CODE)
        except BridgeError as exc:
            # The program could not go on (a batch kernel refused admission or failed to
            # start): the run fails and says why; the session's worker goes on.
            self._fail(exc.message, NOT_STARTED_EXIT_CODE)
        except asyncio.CancelledError:
            self._end(RunState.CANCELLED, Mark("finished", KILLED_EXIT_CODE))
            raise
        finally:
            self._waiting = None
            self._done.set()

    def cancel(self, reason: str) -> None:
        """End a run that never started (its session closed)."""
        if self.state is RunState.QUEUED:
            self._say(reason)
            self._end(RunState.CANCELLED, Mark("finished", KILLED_EXIT_CODE))
            self._done.set()

    def _fail(self, why: str, exit_code: int) -> None:
        self._say(why)
        self.exit_code = exit_code
        self._end(RunState.FAILED, Mark("finished", exit_code))

    def _say(self, why: str) -> None:
        self.error = why
        self.emit(["stderr", f"{why}\n"])

    def mark(self, status: str, exit_code: int | None = None) -> None:
        """An intermediate milestone (``clean-finished``, ``build-finished``)."""
        self._push(Mark(status, exit_code))
        self.notify("status", {"status": status, "exit_code": exit_code})

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self._end(RunState.FINISHED, Mark("finished", exit_code))

    def _end(self, state: RunState, mark: Mark) -> None:
        if self.state.terminal:
            return
        if self._dropped:
            notice: ConsoleItem = ["stderr", f"\n[kernel-bridge: output limit of "
                                   f"{self.output_limit} bytes reached: the run was interrupted;"
                                   f" {self._dropped} bytes dropped]\n"]
            self._transcript.append(notice)  # kept past the cap: it is what explains the cut
            self._records.append(notice)
            self.notify("stderr", {"text": notice[1]})
        self.state = state
        self.finished_at = time.time()
        self._push(mark)
        self.notify("end", {"status": state.value, "exit_code": mark.exit_code})

    def _push(self, rec: ConsoleItem | Mark) -> None:
        self._records.append(rec)
        self._changed.set()

    def output_room(self) -> int:
        """Bytes of console this run still keeps (the channel pump drops output past it
        before decoding it)."""
        return self.output_limit - self._bytes

    def output_dropped(self, size: int) -> None:
        self._dropped += size

    def emit(self, item: ConsoleItem) -> None:
        value = item[1]
        size = len(value) if isinstance(value, str) else len(str(value))
        room = self.output_limit - self._bytes
        if size > room:
            # Keep reading the kernel (so it never blocks on us) but keep nothing more. A stream
            # chunk is cut to fit: one big flush must not leave the console empty.
            if room <= 0 or item[0] not in ("stdout", "stderr"):
                self._dropped += size
                return
            item = [item[0], value[:room]]
            self._dropped += size - room
            size = room
        self._bytes += size
        self._transcript.append(item)
        self._push(item)
        if item[0] in ("stdout", "stderr"):
            self.notify(item[0], {"text": item[1]})

    async def step(self, kernel: Liveness, code: str, *, allow_stdin: bool = True,
                   on_stream: StreamSink | None = None) -> StepOutcome:
        """Execute ``code`` on one kernel until its reply and idle status have both arrived
        (or iopub went quiet after the reply: :meth:`~bridge.channels.Channels.request`).

        Stream output goes to the run's console, or to ``on_stream`` when given (a program
        that speaks a protocol on its stdout, as the judge runner does).
        Raises KernelDied; TimeoutError propagates from the run's deadline.
        """
        notified = replied = False

        def on_message(channel: Channel, msg: Message) -> None:
            nonlocal notified, replied
            msg_type = msg["header"].get("msg_type", "")
            content = msg["content"]
            if channel == "shell" and msg_type == "execute_reply":
                replied = True
            elif msg_type == RESET:
                # The kernel's message was refused (over the size cap) and what it sent during
                # the reconnect is lost: say so (once, and not when the kernel died: that
                # resets every channel) and do not wait for what may have been lost.
                if not notified:
                    notified = True
                    spawn(self._notice_reset(kernel))
            elif channel == "iopub":
                if msg_type == "stream" and on_stream is not None:
                    on_stream(str(content.get("name", "stdout")), str(content.get("text", "")))
                elif msg_type in OUTPUT_TYPES:
                    for item in from_message(msg_type, content):
                        self.emit(item)
            elif channel == "stdin" and msg_type == "input_request":
                self._on_input_request(kernel, content)

        async def check() -> None:
            if not replied:  # the code ended: what still flows is in flight, not a flood
                await self._stop_flood(kernel)
            if not await kernel.is_alive():
                raise KernelDied(KERNEL_DIED)

        content = {"code": code, "silent": False, "store_history": True,
                   "user_expressions": {}, "allow_stdin": allow_stdin, "stop_on_error": False}
        exchange = await kernel.channels.request("execute_request", content,
                                                 on_message=on_message, output=self,
                                                 watch=Watch(self._wait_slice, check))
        outcome = StepOutcome.from_reply(exchange.content)
        self.outcome = outcome
        return outcome

    async def _notice_reset(self, kernel: Liveness) -> None:
        await asyncio.sleep(RESET_SETTLE_S)
        if not self.state.terminal and await kernel.is_alive():
            self.emit(["stderr", RESET_NOTICE])

    def _wait_slice(self) -> float:
        # Past the cap, look again soon: the flood is stopped within a tick, not at the deadline.
        return CAP_CHECK_INTERVAL if self._dropped > self._interrupted_at else LIVENESS_INTERVAL

    async def _stop_flood(self, kernel: Liveness) -> None:
        """Interrupt the kernel while its output is being dropped: output past the cap is neither
        kept nor worth producing. Again on a later tick if the code ignored the interrupt."""
        if (kernel.interrupt is not None and self._dropped > self._interrupted_at
                and time.monotonic() - self._interrupt_time >= REINTERRUPT_AFTER_S):
            self._interrupted_at = self._dropped
            self._interrupt_time = time.monotonic()
            await kernel.interrupt()

    def _on_input_request(self, kernel: Liveness, content: dict[str, Any]) -> None:
        prompt = str(content.get("prompt", ""))
        if self._stdin_lines is not None:
            # One-shot dialects give all input up front; past its end, programs read end-of-file
            # ("\x04" is Jupyter's Ctrl-D: EOFError in ipykernel, a closed stdin elsewhere).
            line = self._stdin_lines.popleft() if self._stdin_lines else "\x04"
            kernel.channels.reply_input(line)
            return
        if prompt:
            self.emit(["stdout", prompt])
        self.state = RunState.WAITING_INPUT
        self.notify("status", {"status": RunState.WAITING_INPUT.value})
        self._waiting = kernel
        mark = Mark("waiting-input", None, {"is_password": bool(content.get("password"))})
        # Process kernels print their prompt on iopub just before they send the request on
        # stdin; the two sockets are read independently, so give iopub a moment to deliver
        # the prompt before the client is told the run waits (it is then in the same result).
        asyncio.get_running_loop().call_later(INPUT_SETTLE_S, self._push_if_waiting, mark)

    def _push_if_waiting(self, mark: Mark) -> None:
        if self.state is RunState.WAITING_INPUT:
            self._push(mark)


def code_program(target: Callable[[], Liveness], rule: ExitRule, before: str = "",
                 after: str = "") -> Program:
    """The program of a run of code: ``before`` and ``after`` (set-up and clean-up, no stdin)
    around ``code``, whose reply gives the run's exit code by ``rule``."""

    async def program(run: Run) -> None:
        kernel = target()
        if before:
            await run.step(kernel, before, allow_stdin=False)
        outcome = await run.step(kernel, run.code)
        # Only after a normal end: a timed-out or dead kernel is replaced, not cleaned up.
        if after:
            await run.step(kernel, after, allow_stdin=False)
        run.outcome = outcome
        run.finish(outcome.exit_code(rule))

    return program
