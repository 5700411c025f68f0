"""The host process of a REPL kernel: one long-lived interpreter and its pipes.

Commands go to the host as JSON lines on ``$KB_CMD_FD``; events come back as JSON lines on
``$KB_EVENT_FD``; the host's real stdout/stderr carry only user output. Everything is read by the
kernel's event loop and queued as :class:`Item`s in the order the kernel must publish them.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from typing import Any, Literal, NamedTuple

# Shutdown: time for the host to leave on its own (command pipe closed), then after SIGTERM.
STOP_GRACE_S = 1.0

Event = dict[str, Any]


class Item(NamedTuple):
    """One thing the host produced, in the order the kernel must publish it."""

    kind: Literal["stream", "end", "event", "exited", "wake"]
    name: str = ""  # stream name
    text: str = ""
    event: Event | None = None
    code: int = 0  # exit status of the host (128 + signal), or the cell id of an "end"


class HostProcess:
    """The interpreter process and its three pipes, read by the shell's event loop."""

    def __init__(self, argv: list[str]) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._event_r, event_w = os.pipe()
        # After each cell the host writes an end marker on stdout and on stderr. Order holds
        # within one pipe, never across pipes: a cell is over only when its "done" event and
        # both markers have been read, so no output of it can trail into the next cell.
        self._token = secrets.token_hex(8)
        self._marker = re.compile("\x01" + self._token + ":(\\d+)\x01")
        self._carry = {"stdout": "", "stderr": ""}
        env = {**os.environ, "KB_CMD_FD": str(cmd_r), "KB_EVENT_FD": str(event_w),
               "KB_END_TOKEN": self._token}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,  # reading stdin gets EOF instead of hanging the cell
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(cmd_r, event_w),
            env=env,
            # Own process group: an interrupt reaches the host and its children only.
            start_new_session=True,
        )
        os.close(cmd_r)
        os.close(event_w)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._fds = {
            self.proc.stdout.fileno(): "stdout",
            self.proc.stderr.fileno(): "stderr",
        }
        # Multi-byte characters may be split across reads.
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")
        }
        self._event_buf = b""
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfd: int | None = None
        self.returncode: int | None = None
        self._close_lock = threading.Lock()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the pipes on ``loop`` (idempotent)."""
        if self._loop is not None:
            return
        self._loop = loop
        for fd in (*self._fds, self._event_r):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._on_readable, fd)
        try:
            # A pidfd reports the host's death even if a child it spawned keeps
            # our pipes open.
            self._pidfd = os.pidfd_open(self.proc.pid)
            loop.add_reader(self._pidfd, self._check_exit)
        except (AttributeError, OSError):
            self._pidfd = None

    def send(self, command: Event) -> None:
        data = (json.dumps(command) + "\n").encode()
        with contextlib.suppress(BrokenPipeError, OSError):  # a dead host is reported by the queue
            while data:
                data = data[os.write(self._cmd_w, data) :]

    def interrupt(self) -> None:
        """SIGINT the host's group; safe to call from another thread."""
        self._signal(signal.SIGINT)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, Item("wake"))

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _close_fds(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        self._close_commands()
        for fd in (self._event_r, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._pidfd = None

    def _close_commands(self) -> None:
        # Exactly once, though stop() runs on the control thread: a second close
        # could hit an fd number that another thread has reused meanwhile.
        with self._close_lock:
            if self._cmd_w >= 0:
                os.close(self._cmd_w)
                self._cmd_w = -1

    async def stop(self) -> None:
        """Close the command pipe, then SIGTERM, then SIGKILL, each with a bounded wait."""
        self._close_commands()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self._signal(sig)
            deadline = time.monotonic() + STOP_GRACE_S
            # Polling, not the exit event: shutdown runs on the control thread's loop.
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.proc.poll() is not None:
                return

    def _on_readable(self, fd: int) -> None:
        if fd == self._event_r:
            # Everything the cell printed was written before this event: publish it first.
            self._read_streams()
            self._read_events()
        else:
            self._read_stream(fd)

    def _read_streams(self) -> None:
        for fd in self._fds:
            self._read_stream(fd)

    def _read_stream(self, fd: int) -> None:
        name = self._fds[fd]
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._stop_reading(fd)
                return
            self._split(name, self._decoders[name].decode(chunk))

    def _split(self, name: str, text: str) -> None:
        """Queue ``text`` as stream items and end markers, holding back a partial marker."""
        text = self._carry[name] + text
        start = 0
        for m in self._marker.finditer(text):
            if m.start() > start:
                self.queue.put_nowait(Item("stream", name=name, text=text[start:m.start()]))
            self.queue.put_nowait(Item("end", name=name, code=int(m.group(1))))
            start = m.end()
        rest = text[start:]
        cut = rest.rfind("\x01")
        tail = rest[cut:] if cut != -1 else ""
        head = "\x01" + self._token + ":"
        # A trailing piece that may still grow into a marker waits for the next read.
        could_grow = head.startswith(tail) or (
            tail.startswith(head) and tail[len(head):].isdigit())
        if tail and could_grow:
            self._carry[name], rest = tail, rest[:cut]
        else:
            self._carry[name] = ""
        if rest:
            self.queue.put_nowait(Item("stream", name=name, text=rest))

    def _read_events(self) -> None:
        while True:
            try:
                chunk = os.read(self._event_r, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._stop_reading(self._event_r)
                self._check_exit()
                return
            self._event_buf += chunk
            *lines, self._event_buf = self._event_buf.split(b"\n")
            for line in lines:
                self.queue.put_nowait(Item("event", event=json.loads(line)))

    def _stop_reading(self, fd: int) -> None:
        if self._loop is not None:
            self._loop.remove_reader(fd)

    def _check_exit(self) -> None:
        if self.returncode is not None:
            return
        status = self.proc.poll()
        if status is None:
            if self._pidfd is None and self._loop is not None:
                self._loop.call_later(0.05, self._check_exit)
            return
        # Set first: the reads below may hit EOF, which calls back into this method.
        self.returncode = status if status >= 0 else 128 - status
        self._read_streams()
        self._read_events()
        for fd in (*self._fds, self._event_r, self._pidfd):
            if fd is not None:
                self._stop_reading(fd)
        self._close_fds()
        self.queue.put_nowait(Item("exited", code=self.returncode))
