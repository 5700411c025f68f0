"""A connection to a keeper (``kernelspecs/_zygote.py``): the process that is the parent and
reaper of kernels and outlives the server (issue 15).

:class:`Keeper` sends requests and reads answers, kernel exits and kernels' stderr lines; the
server that started a keeper talks to it over a socketpair (``bridge.zygote.ZygoteProcess``), a
later one reaches it on the socket it listens on in the IPC root (:func:`reach`), verified by
pid and start time. JSON messages, file descriptors by SCM_RIGHTS, read on the event loop
(``add_reader``); nothing here blocks but :func:`kill_held`, made for a sweep in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import struct
from collections.abc import Mapping
from typing import Any

from . import kernel_logs

log = logging.getLogger(__name__)

FORK_TIMEOUT_S = 10.0  # how long a keeper may take to answer
MAX_UNCLAIMED_EXITS = 1024
LEAVING_WAIT_TICKS = 50  # × 10 ms


class ZygoteUnavailable(RuntimeError):
    """No zygote can fork this kernel now; start it cold."""


def _kill(pidfd: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)


def start_time(pid: int) -> int | None:
    """A live process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with
    its pid, a name no later process can have. None for no process, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


class Keeper:
    """A connection to a zygote or keeper process (``kernelspecs/_zygote.py``): requests,
    replies, and the exits of the kernels it holds. The server that started it has one over a
    socketpair (:class:`ZygoteProcess`); a later server reaches it on its listening socket
    (:meth:`connect`)."""

    def __init__(self, sock: socket.socket, pid: int, path: str) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.pid = pid
        self.path = path  # where a later server reaches it
        self.born = start_time(pid)  # with the pid, names this process alone
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.replies: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self.exits: dict[int, int] = {}
        self._ids = itertools.count(1)
        loop.add_reader(self.sock.fileno(), self._readable)

    @classmethod
    async def connect(cls, handle: Mapping[str, Any]) -> Keeper:
        """Reach the keeper a record names, verified by pid and start time (a pid reused by
        another process, a socket someone else bound: refused). Raises ZygoteUnavailable."""
        pid, path = int(handle["pid"]), str(handle["socket"])
        # A keeper leaves with its last kernel, and its kernels die with it.
        gone = f"it ended while no server watched it, and so did its keeper (pid {pid})"
        if start_time(pid) != handle.get("start"):
            raise ZygoteUnavailable(gone)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            peer, uid, _gid = struct.unpack("3i", creds)
        except OSError as exc:
            sock.close()
            # A keeper removes its socket as it leaves, an instant before it exits: one
            # without a socket is given that instant.
            for _ in range(LEAVING_WAIT_TICKS if isinstance(exc, FileNotFoundError) else 0):
                if start_time(pid) != handle.get("start"):
                    break
                await asyncio.sleep(0.01)
            if start_time(pid) != handle.get("start"):
                raise ZygoteUnavailable(gone) from exc
            raise ZygoteUnavailable(f"its keeper (pid {pid}) does not answer: {exc}") from exc
        if peer != pid or uid != os.getuid() or start_time(pid) != handle.get("start"):
            sock.close()
            raise ZygoteUnavailable(f"{path} is not the kernel's keeper")
        keeper = cls(sock, pid, path)
        keeper.ready.set_result({})
        return keeper

    def handle(self) -> dict[str, Any]:
        """What a record keeps to reach this keeper again."""
        return {"socket": self.path, "pid": self.pid, "start": self.born}

    def _readable(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._gone()
                return
            self._message(json.loads(data), fds)

    def _message(self, msg: dict[str, Any], fds: list[int]) -> None:
        if "log" in msg:  # a line of a kernel's stderr
            kernel_logs.record(str(msg["log"]), str(msg.get("line", "")))
        elif "exit" in msg:
            self.exits[int(msg["exit"])] = int(msg["status"])
            while len(self.exits) > MAX_UNCLAIMED_EXITS:  # kernels nobody polled after a kill
                del self.exits[next(iter(self.exits))]
        elif msg.get("ready"):
            self._on_ready(msg)
        elif "id" in msg:
            fut = self.replies.pop(int(msg["id"]), None)
            if fut is None or fut.done():
                for fd in fds:  # a fork whose asker gave up: it must not run unowned
                    _kill(fd)
            else:
                fut.set_result((msg, fds))

    def _on_ready(self, msg: dict[str, Any]) -> None:
        if not self.ready.done():
            self.ready.set_result(msg)

    def _gone(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        err = ZygoteUnavailable("the zygote exited")
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()  # retrieved: nobody may be waiting
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(err)
        self.replies.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def alive(self) -> bool:
        return not self.closed.done()

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if not self.alive:
            raise ZygoteUnavailable("the zygote exited")
        try:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], fds or [])
        except OSError as exc:
            raise ZygoteUnavailable(f"cannot reach the zygote: {exc}") from exc

    async def request(self, req: dict[str, Any],
                      fds: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:
        """Send ``req`` and wait for its answer (the message and the descriptors it carries,
        which the caller then owns). Raises ZygoteUnavailable."""
        rid = next(self._ids)
        fut: asyncio.Future[tuple[dict[str, Any], list[int]]] = \
            asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        done = False
        try:
            self.send({**req, "id": rid}, fds)
            async with asyncio.timeout(FORK_TIMEOUT_S):
                result = await fut
            done = True
            return result
        except TimeoutError as exc:
            raise ZygoteUnavailable("the zygote did not answer") from exc
        finally:
            self.replies.pop(rid, None)
            if not done and fut.done() and not fut.cancelled() and fut.exception() is None:
                for fd in fut.result()[1]:
                    _kill(fd)  # forked, but nobody is left to take it

    async def start(self, op: str, req: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        """``fork`` or ``spawn`` → (host pid, pidfd); the caller owns the pidfd."""
        msg, got = await self.request({**req, "op": op}, fds)
        if "pid" in msg and got:
            for fd in got[1:]:
                os.close(fd)
            return int(msg["pid"]), got[0]
        for fd in got:
            os.close(fd)
        raise ZygoteUnavailable(str(msg.get("error", "no pid")))

    async def adopt(self, pid: int) -> tuple[int | None, int | None]:
        """A kernel this keeper holds → (pidfd, None) while it lives, (None, exit status) once
        it ended. Raises ZygoteUnavailable when the keeper knows no such kernel."""
        msg, got = await self.request({"op": "adopt", "pid": pid})
        if "pid" in msg and got:
            return got[0], None
        for fd in got:
            os.close(fd)
        if "gone" in msg:
            return None, int(msg["status"])
        raise ZygoteUnavailable(str(msg.get("error", "unknown kernel")))

    def exit_status(self, pid: int) -> int | None:
        return self.exits.pop(pid, None)

    def detach(self) -> None:
        """Close our end; the keeper keeps its kernels (and exits with its last one)."""
        if self.alive:
            self._gone()


async def reach(handle: Mapping[str, Any]) -> Keeper:
    """The keeper a record names (one connection per keeper, shared by its kernels). Raises
    ZygoteUnavailable when it is gone or is not the one named."""
    path = str(handle["socket"])
    # One connection at a time per keeper: kernels adopted at once share it (two connections
    # raced, and the one replaced took the pidfds it had handed out with it: busy kernels
    # adopted together were found dead and killed).
    async with _reaching.setdefault(path, asyncio.Lock()):
        keeper = _reached.get(path)
        if keeper is None or not keeper.alive or keeper.pid != handle.get("pid"):
            keeper = _reached[path] = await Keeper.connect(handle)
    return keeper


_reached: dict[str, Keeper] = {}
_reaching: dict[str, asyncio.Lock] = {}


def kill_held(handle: Mapping[str, Any], pids: list[int]) -> None:
    """SIGKILL kernels a keeper holds, by pidfds it hands out (a blocking exchange, for a sweep
    in a thread; a keeper that is gone took its kernels with it)."""
    pid = int(handle["pid"])
    if start_time(pid) != handle.get("start"):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.settimeout(FORK_TIMEOUT_S)
            sock.connect(str(handle["socket"]))
            peer = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            if peer != pid:
                return
            for n, kernel in enumerate(pids, 1):
                socket.send_fds(sock, [json.dumps({"op": "adopt", "pid": kernel, "id": n})
                                       .encode()], [])
                while True:  # past exit reports of other kernels
                    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 4)
                    if not data or json.loads(data).get("id") == n:
                        break
                for fd in fds:
                    _kill(fd)
        except OSError as exc:
            log.warning("cannot reach the keeper %s: %s", handle.get("socket"), exc)
