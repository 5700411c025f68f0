"""A kernel's stderr, relayed into the server's log as records (one per line).

Kernels write diagnostics (tracebacks of the kernel machinery, not user output: that travels on
iopub) to stderr. Inherited as-is they would land between the server's records and break a
``KB_LOG_FORMAT=json`` log; relayed, each line is a ``kernel_bridge.kernel`` record with the
kernel's id. The pipe is read on the event loop (no thread per kernel). A kernel held by a keeper
(``kernelspecs/_zygote.py``) has its stderr read by the keeper instead, which sends each line to
whichever server is connected (:func:`record` here), before and after a restart of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger("kernel_bridge.kernel")
MAX_LINE = 8192


class StderrRelay:
    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self._read_fd, self.write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._buf = b""
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
        if not chunk:
            self.close()
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            lines.append(self._buf)
            self._buf = b""
        for line in lines:
            text = line.decode(errors="replace").rstrip()
            if text:
                record(self.kernel_id, text)

    def close(self) -> None:
        if self._read_fd < 0:
            return
        if self._buf.strip():
            self._buf += b"\n"
            self._on_flush()
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._read_fd)
        with contextlib.suppress(OSError):
            os.close(self._read_fd)
        self._read_fd = -1
        self.launched()

    def _on_flush(self) -> None:
        text = self._buf.decode(errors="replace").strip()
        self._buf = b""
        record(self.kernel_id, text)


def record(kernel_id: str, text: str) -> None:
    """One line of a kernel's stderr as a log record (also for lines a keeper relays)."""
    log.warning("kernel %s: %s", kernel_id, text[:MAX_LINE], extra={"kernel_id": kernel_id})
