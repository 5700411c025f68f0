"""Who may use a data dir: one server with SQLite, any number of replicas with PostgreSQL.

With SQLite the data dir is one server's: a second ``serve`` on it would sweep the first one's
sessions, files and cgroups at start-up. ``flock`` (not a pid file) is released by the kernel when
the holder dies, so a ``kill -9`` never leaves a stale lock behind; the pid written into the file
is only there to name the holder in the refusal.

With PostgreSQL (``KB_DATABASE_URL``) the data dir is the replicas' shared storage root, so
nothing is exclusive: each replica instead holds a lease ``replica:<id>`` in the database,
renewed while it runs (:class:`ReplicaPresence`); the live replicas are the unexpired ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import uuid
from pathlib import Path

from .errors import StartupRefused
from .store import Store
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

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


# A replica that stops renewing (killed, host lost) drops out of the live list this long after.
PRESENCE_TTL_S = 15.0
PRESENCE_PREFIX = "replica:"


class ReplicaPresence:
    """This replica's lease ``replica:<id>``, renewed every third of its lifetime."""

    def __init__(self, store: Store, ttl_s: float = PRESENCE_TTL_S,
                 replica_id: str | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.name = PRESENCE_PREFIX + self.id
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        """Announce this replica; returns the other live replicas' ids."""
        await self.store.try_lease(self.name, self.id, self.ttl_s)
        self._task = asyncio.create_task(self._renew_forever())
        return await self.others()

    async def others(self) -> list[str]:
        live = await self.store.leases(PRESENCE_PREFIX)
        return [holder for name, holder in live.items() if name != self.name]

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.store.renew(self.name, self.id, self.ttl_s):
                    # Lapsed (the database was out of reach): take it again.
                    log.warning("replica lease %s had lapsed; taken again", self.name)
                    await self.store.try_lease(self.name, self.id, self.ttl_s)
            except Exception as exc:
                log.warning("replica lease %s not renewed: %s", self.name, exc)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self.store.release(self.name, self.id)
