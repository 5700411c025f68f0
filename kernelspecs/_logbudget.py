"""How many lines of a kernel's raw stderr (fd 2) reach the server's log: a per-kernel budget.

A kernel's fd 2 is for diagnostics of the kernel machinery (user output travels on iopub), but a
tenant can write to it at will: ``os.write(2, b"x\\n" * 10**7)`` would be ten million records in
the server's log and on its disk. Whoever reads the pipe (the keeper, ``kernelspecs/_zygote.py``,
or the server itself, ``bridge/kernel_logs.py``) passes its bytes through a :class:`LineBudget`:
a token bucket of ``RATE`` lines a second with bursts of ``BURST``. Past it, lines are counted,
not decoded (``bytes.count``: a flood costs the reader little), and the next line let through is
preceded by one notice saying how many were dropped; so is the end of the pipe.

Imports nothing of the server's: the zygote (kernel side) uses it as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RATE = 100.0  # lines a second, per kernel
BURST = 1000  # lines at once
MAX_LINE = 8192  # characters of one line; a longer run without a newline is cut into lines


class LineBudget:
    """Cuts a pipe's bytes into lines and lets through what the budget allows."""

    def __init__(self, rate: float = RATE, burst: int = BURST, max_line: int = MAX_LINE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_line = max_line
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._partial = b""
        self.dropped = 0  # lines dropped since the last notice
        self.dropped_total = 0
        self._notices: dict[str, int] = {}  # the last feed's notices → the lines each counts

    def feed(self, chunk: bytes, end: bool = False) -> list[str]:
        """The lines of ``chunk`` to relay (``end``: the pipe closed, what is left is a line).
        A notice of the lines dropped before comes first, and at the end."""
        self._refill()
        self._notices.clear()
        buf = self._partial + chunk if self._partial else chunk
        out: list[str] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._tokens < 1:  # spent: count the rest of the whole lines, do not cut them
                last = buf.rfind(b"\n")
                self.drop(buf.count(b"\n", start, last + 1))
                start = last + 1
                break
            self._line(buf[start:nl], out)
            start = nl + 1
        rest = buf[start:]
        if end or len(rest) > self.max_line:
            if rest:
                if self._tokens >= 1:
                    self._line(rest, out)
                else:
                    self.drop(1)
            rest = b""
        self._partial = rest
        if end and self.dropped:
            out.append(self.notice())
        return out

    def drop(self, lines: int = 1) -> None:
        """Count lines that did not get through (over budget)."""
        self.dropped += lines
        self.dropped_total += lines

    def lost(self, text: str) -> None:
        """A line of the last :meth:`feed` could not be passed on (the reader would have had to
        wait): counted in the next notice, and so are the lines a lost notice counted."""
        n = self._notices.pop(text, 0)
        self.dropped += n or 1
        self.dropped_total += 0 if n else 1

    def notice(self) -> str:
        n, self.dropped = self.dropped, 0
        text = (f"[kernel-bridge: {n} line{'s' if n != 1 else ''} of stderr dropped (more "
                f"than {self.rate:g} lines/s, bursts of {self.burst})]")
        self._notices[text] = self._notices.get(text, 0) + n
        return text

    def _line(self, raw: bytes, out: list[str]) -> None:
        self._tokens -= 1  # blank lines too: a flood of them costs as much to read
        text = raw[:self.max_line * 4].decode(errors="replace").rstrip()[:self.max_line]
        if not text:
            return
        if self.dropped:
            out.append(self.notice())
        out.append(text)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
