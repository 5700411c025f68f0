"""Run one shell command for a kernel: stream its output, feed its stdin, stop it.

The kernel's event loop must stay free while a program runs, because the same
loop publishes output and waits for ``input_reply``; so everything here is
non-blocking: raw pipes watched with ``loop.add_reader`` and a pidfd that
becomes readable when the command exits.

Process model: the command runs as ``bash -c <script>`` in a new session, so
its process group id is its pid and one ``killpg`` reaches every process it
started (unless one escapes with ``setsid``).  When the command's leader exits
the rest of its group is killed too: a code-execution server must not leak
background jobs from one cell into the next.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import enum
import fcntl
import os
import signal
import subprocess
import termios
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from ._stdin import blocked_on_stdin, pipe_identity

StreamName = Literal["stdout", "stderr"]
OutputSink = Callable[[StreamName, str], None]
# Returns the user's answer, or None for end-of-file.
InputSource = Callable[[], Awaitable[str | None]]

# How often to look for a blocked stdin read: fast enough to feel instant,
# slow enough that walking /proc costs nothing noticeable.
STDIN_POLL_SECONDS: Final = 0.03
# After an interrupt, time the program gets to handle SIGINT before SIGKILL.
INTERRUPT_GRACE_SECONDS: Final = 0.5
# After the leader exits, time background holders of its pipes get to finish.
DRAIN_GRACE_SECONDS: Final = 0.2
_READ_SIZE: Final = 65536


class CommandState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RunResult:
    exit_code: int  # signals are reported as 128 + n, like a shell does
    interrupted: bool
    signal: int | None = None  # the signal that ended the command's leader, if one did


def exit_code_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _pending_bytes(fd: int) -> int:
    # FIONREAD works on either end of a Linux pipe: both share one buffer.
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little", signed=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _restore_signals() -> None:
    # IPKernelApp ignores SIGINT, and ignored dispositions survive exec: without
    # this, Ctrl-C (our interrupt) would never reach the user's program.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class _OutputPipe:
    """Non-blocking reader of one output pipe that decodes UTF-8 incrementally."""

    def __init__(self, fd: int, name: StreamName, sink: OutputSink) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.name: StreamName = name
        self._sink = sink
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eof = asyncio.get_running_loop().create_future()

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        if data:
            self._emit(self._decoder.decode(data))
        else:
            self.close()

    def drain(self) -> None:
        """Publish whatever sits in the pipe now (the prompt before a blocked read)."""
        while not self.eof.done() and _pending_bytes(self.fd) > 0:
            self.on_readable()

    def close(self) -> None:
        if self.eof.done():
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        self._emit(self._decoder.decode(b"", final=True))
        os.close(self.fd)
        self.eof.set_result(None)

    def _emit(self, text: str) -> None:
        if text:
            self._sink(self.name, text)


class CommandRun:
    """One execution of ``bash -c script``; ``run()`` may be awaited once."""

    def __init__(
        self,
        script: str,
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        on_output: OutputSink,
        ask_input: InputSource | None,
    ) -> None:
        self._script = script
        self._cwd = cwd
        self._env = dict(env) if env is not None else None
        self._on_output = on_output
        self._ask_input = ask_input
        self._state = CommandState.CREATED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._interrupted = False
        self._kill_timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> CommandState:
        return self._state

    def interrupt(self) -> None:
        """Stop the command's process group; safe to call from any thread."""
        if self._loop is not None and self._state is CommandState.RUNNING:
            self._loop.call_soon_threadsafe(self._interrupt_now)

    def kill(self) -> None:
        """SIGKILL the command's process group now; safe from any thread."""
        if self._state is CommandState.RUNNING:
            self._signal_group(signal.SIGKILL)

    def _interrupt_now(self) -> None:
        if self._state is not CommandState.RUNNING or self._loop is None:
            return
        self._interrupted = True
        self._signal_group(signal.SIGINT)
        if self._kill_timer is None:
            self._kill_timer = self._loop.call_later(
                INTERRUPT_GRACE_SECONDS, self._signal_group, signal.SIGKILL
            )

    def _signal_group(self, signum: int) -> None:
        if self._pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
            os.killpg(self._pid, signum)

    async def run(self) -> RunResult:
        if self._state is not CommandState.CREATED:
            raise RuntimeError(f"expected {CommandState.CREATED.value}, got {self._state.value}")
        self._state = CommandState.RUNNING
        self._loop = loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # A blocking Popen is fine here: fork+exec takes a few ms, and the
            # pipes and pidfd it needs are then watched without blocking.
            proc = subprocess.Popen(
                ["bash", "-c", self._script],
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                cwd=self._cwd,
                env=self._env,
                start_new_session=True,
                # Only resets two signal dispositions: no locks, no imports.
                preexec_fn=_restore_signals,
            )
        except BaseException:
            for fd in (in_r, in_w, out_r, err_r):
                os.close(fd)
            self._state = CommandState.FINISHED
            raise
        finally:
            for fd in (out_w, err_w):
                os.close(fd)
        os.close(in_r)
        self._pid = proc.pid
        pipes = [
            _OutputPipe(out_r, "stdout", self._on_output),
            _OutputPipe(err_r, "stderr", self._on_output),
        ]
        for pipe in pipes:
            loop.add_reader(pipe.fd, pipe.on_readable)
        exited = self._watch_exit(proc)
        try:
            await self._serve_stdin(in_w, exited, pipes)
            returncode = await exited
            # Background jobs may hold the pipes open; give them a moment.
            await asyncio.wait([p.eof for p in pipes], timeout=DRAIN_GRACE_SECONDS)
        finally:
            self._signal_group(signal.SIGKILL)
            for pipe in pipes:
                pipe.drain()
                pipe.close()
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            self._state = CommandState.FINISHED
            if proc.poll() is None:  # cancelled while running
                proc.wait()
        return RunResult(exit_code=exit_code_of(returncode), interrupted=self._interrupted,
                         signal=-returncode if returncode < 0 else None)

    def _watch_exit(self, proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
        """A future with the return code, resolved as soon as the leader exits."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = -1  # kernel < 5.3: fall back to polling

        def check() -> None:
            code = proc.poll()
            if code is None:
                if pidfd < 0:
                    loop.call_later(0.01, check)
                return
            if pidfd >= 0:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            if not done.done():
                done.set_result(code)

        if pidfd >= 0:
            loop.add_reader(pidfd, check)
        check()
        return done

    async def _serve_stdin(
        self, in_w: int, exited: asyncio.Future[int], pipes: list[_OutputPipe]
    ) -> None:
        """Answer blocked stdin reads until the command exits, then close stdin."""
        try:
            ask_input = self._ask_input
            if ask_input is None or self._pid is None:
                return  # closing stdin now makes a read see EOF at once
            target = pipe_identity(in_w)
            while not exited.done():
                await asyncio.wait([exited], timeout=STDIN_POLL_SECONDS)
                if exited.done() or _pending_bytes(in_w) > 0:
                    continue  # unread input: the reader is not waiting for more
                if not blocked_on_stdin(self._pid, target):
                    continue
                for pipe in pipes:
                    pipe.drain()  # the prompt must go out before the input_request
                answer = await self._ask_or_exit(ask_input, exited)
                if answer is None:
                    return
                await self._write_all(in_w, (answer + "\n").encode())
        finally:
            os.close(in_w)

    async def _ask_or_exit(self, ask_input: InputSource, exited: asyncio.Future[int]) -> str | None:
        ask = asyncio.ensure_future(ask_input())
        either: list[asyncio.Future[Any]] = [ask, exited]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not ask.done():
            ask.cancel()  # the program exited (or was interrupted) meanwhile
            return None
        return ask.result()

    async def _write_all(self, fd: int, data: bytes) -> None:
        # Non-blocking: a long answer must not stall the loop that drains the
        # program's stdout, or both sides would wait on full pipes.
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _resolve, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(fd)
            except BrokenPipeError:
                return  # the program closed its stdin; the rest is moot
