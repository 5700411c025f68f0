"""One owner per data dir: an advisory lock held for the server's whole life.

With SQLite the data dir is one server's: a second ``serve`` on it would sweep the first one's
sessions, files and cgroups at start-up. ``flock`` (not a pid file) is released by the kernel when
the holder dies, so a ``kill -9`` never leaves a stale lock behind; the pid written into the file
is only there to name the holder in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import StartupRefused

LOCK_NAME = "server.lock"


class DataDirInUse(StartupRefused):
    def __init__(self, data_dir: Path, pid: str) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"data dir {data_dir} in use by {holder}")
        self.pid = pid


class DataDirLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process's death)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirInUse; touches nothing else in the data dir."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirInUse(self.data_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock
