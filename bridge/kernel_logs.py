"""A kernel's stderr, relayed into the server's log as records (one per line).

Kernels write diagnostics (tracebacks of the kernel machinery, not user output: that travels on
iopub) to stderr. Inherited as-is they would land between the server's records and break a
``KB_LOG_FORMAT=json`` log; relayed, each line is a ``kernel_bridge.kernel`` record with the
kernel's id. The pipe is read on the event loop (no thread per kernel). A kernel held by a keeper
(``kernelspecs/_zygote.py``) has its stderr read by the keeper instead, which sends each line to
whichever server is connected (:func:`record` here), before and after a restart of the server.

Either reader lets through at most a budget of lines per kernel (``kernelspecs/_logbudget.py``:
100 a second, bursts of 1000, then one "N lines dropped" notice): a tenant who floods its fd 2
fills neither this log nor its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from kernelspecs._logbudget import MAX_LINE, LineBudget

log = logging.getLogger("kernel_bridge.kernel")


class StderrRelay:
    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self._read_fd, self.write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._budget = LineBudget()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read_fd, self._on_readable)

    def launched(self) -> None:
        """The child has its copy of the write end: close ours, so EOF comes when it exits."""
        if self.write_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.write_fd)
            self.write_fd = -1  # never close a number the process may have reused

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self._read_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        for text in self._budget.feed(chunk, end=not chunk):
            record(self.kernel_id, text)
        if not chunk:
            self.close()

    def close(self) -> None:
        if self._read_fd < 0:
            return
        for text in self._budget.feed(b"", end=True):  # a last line without its newline
            record(self.kernel_id, text)
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._read_fd)
        with contextlib.suppress(OSError):
            os.close(self._read_fd)
        self._read_fd = -1
        self.launched()


def record(kernel_id: str, text: str) -> None:
    """One line of a kernel's stderr as a log record (also for lines a keeper relays)."""
    log.warning("kernel %s: %s", kernel_id, text[:MAX_LINE], extra={"kernel_id": kernel_id})
