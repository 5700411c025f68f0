"""The server's side of the keepers (``kernelspecs/_zygote.py``): start them, ask them for
kernels, learn how they ended, recycle them, and reach those a previous server left.

A *keeper* is the parent and reaper of the kernels it started, and outlives the server
(issue 15). A *zygote* is a keeper with a pre-imported template that forks Python kernels; the
*plain* keeper has none and spawns every other kernel (:func:`for_interpreters` gives a server
both). One :class:`Zygotes` per line. It keeps one *current* process that takes requests and
the retired ones that still hold kernels (a retired keeper exits once its last kernel has). A
zygote is replaced after ``max_forks`` forks (its children share one hash secret, ASLR layout
and stack canary) or once its own memory has grown (what it dirtied is no longer shared with new
kernels). If one dies, requests fail with :class:`ZygoteUnavailable` and the caller starts the
kernel another way; a new one is started at most every ``RESTART_BACKOFF_S``.

Talking to the keepers this server started is one SOCK_SEQPACKET socketpair each (a
:class:`ZygoteProcess`); a later server reaches them on the socket each listens on in the IPC
root (:func:`reach`, verified by pid and start time). JSON messages, file descriptors by
SCM_RIGHTS, read on the event loop (``add_reader``); nothing here blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import site
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import kernel_logs

log = logging.getLogger(__name__)

# kernelspec modules the zygote can fork (``python -m <module>`` with our interpreter).
FORKABLE = ("ipykernel_launcher", "kernelspecs.bash_kernel", "kernelspecs.compiled_kernel")
# A client environment naming any of these changes how an interpreter starts (or what it loads
# before main): a forked kernel cannot honour it, so such a kernel starts cold.
INTERPRETER_ENV = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "LANG", "LC_", "OPENBLAS", "OMP_",
                   "MKL_", "JPY_", "TZDIR")
# Threads at import time would make the template unsafe to fork (zygote.md §3).
TEMPLATE_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "NUMEXPR_NUM_THREADS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
READY_TIMEOUT_S = 30.0
FORK_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = 5.0
GROWTH_LIMIT_BYTES = 48 * 1024 * 1024  # the template's own private growth that retires it
GROWTH_CHECK_EVERY = 25
MAX_UNCLAIMED_EXITS = 1024
KEEPER = ""  # the plain keeper's key among the server's lines (zygote lines: an interpreter)


class ZygoteUnavailable(RuntimeError):
    """No zygote can fork this kernel now; start it cold."""


def for_interpreters(env: Mapping[str, str], max_forks: int, pythons: list[str], *,
                     fork: bool = True, sockets_dir: Path | None = None) -> dict[str, Zygotes]:
    """The server's keepers: the plain keeper that spawns cold kernels (key :data:`KEEPER`),
    and with ``fork`` a zygote line per interpreter kernels start with: the server's own, and an
    operator's Python environment when our kernel package can be put on its path without the
    server's site-packages (a checkout): a foreign interpreter must not import the server's
    packages. Each listens in ``sockets_dir`` for a later server to adopt its kernels."""
    pkg_parent = str(kernel_package().parent)
    lines = {KEEPER: Zygotes(env, 0, plain=True, sockets_dir=sockets_dir)}
    for python in dict.fromkeys(pythons) if fork else ():
        if python == sys.executable or pkg_parent not in site.getsitepackages():
            lines[python] = Zygotes(env, max_forks, python, sockets_dir=sockets_dir)
    return lines


async def reach(handle: Mapping[str, Any]) -> Keeper:
    """The keeper a record names (one connection per keeper, shared by its kernels). Raises
    ZygoteUnavailable when it is gone or is not the one named."""
    path = str(handle["socket"])
    keeper = _reached.get(path)
    if keeper is None or not keeper.alive or keeper.pid != handle.get("pid"):
        keeper = _reached[path] = await Keeper.connect(handle)
    return keeper


_reached: dict[str, Keeper] = {}


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


def kernel_package() -> Path:
    import kernelspecs  # a source checkout or site-packages

    return Path(next(iter(kernelspecs.__path__))).resolve()


def forkable(cmd: list[str], environ: Mapping[str, str], python: str = sys.executable) -> bool:
    """Whether a zygote running ``python`` can stand in for ``cmd`` run in a client
    environment ``environ``."""
    if len(cmd) < 3 or cmd[0] != python or cmd[1] != "-m" or cmd[2] not in FORKABLE:
        return False
    return not any(k.upper().startswith(INTERPRETER_ENV) for k in environ)


def private_bytes(pid: int) -> int:
    """Private (unique) memory of a process: smaps_rollup's Private_Clean + Private_Dirty."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


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


class ZygoteProcess(Keeper):
    """One running zygote (or plain keeper) this server started: its process, its socket."""

    def __init__(self, env: Mapping[str, str], python: str, *, listen: str = "",
                 plain: bool = False) -> None:
        sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [python, "-m", "kernelspecs._zygote", "--control", str(theirs.fileno())]
        if listen:
            argv += ["--listen", listen]
        if plain:
            argv.append("--plain")
        try:
            # Its own session: a terminal's ^C to the server's group does not reach it.
            self.proc = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), env=dict(env), cwd="/",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        super().__init__(sock, self.proc.pid, listen)
        self.plain = plain
        self.forks = 0
        self.baseline = 0
        self.retired = False

    def _on_ready(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.baseline = private_bytes(self.pid)
        super()._on_ready(msg)

    def _gone(self) -> None:
        super()._gone()
        self._reap()

    def _reap(self, tries: int = 100) -> None:
        """Reap the exited zygote without blocking the loop (it exits just after its socket
        closes, or, holding kernels, much later: then whoever is our init reaps it)."""
        if self.proc.poll() is None and tries > 0:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                asyncio.get_running_loop().call_later(0.05, self._reap, tries - 1)

    async def fork(self, req: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        self.forks += 1
        return await self.start("fork", req, fds)

    def retire(self) -> None:
        self.retired = True
        with contextlib.suppress(ZygoteUnavailable):
            self.send({"op": "retire"})

    def grown(self) -> bool:
        try:
            return private_bytes(self.pid) - self.baseline > GROWTH_LIMIT_BYTES
        except OSError:
            return False

    async def stop(self, keep_kernels: bool = False) -> None:
        if keep_kernels:
            self.detach()
            return
        with contextlib.suppress(ZygoteUnavailable):
            self.send({"op": "stop"})  # kills what it still holds and exits
        if self.alive:
            self._gone()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.proc.wait, 5)
        with contextlib.suppress(Exception):
            self.proc.kill()


class Zygotes:
    """One line of keepers: the zygotes of one interpreter (forks kernels, recycled after
    ``max_forks`` or growth, restarted when one dies), or with ``plain`` the keeper that spawns
    cold kernels. Each process it started holds its kernels beyond the server's life and
    listens in ``sockets_dir`` for a later server to adopt them."""

    def __init__(self, env: Mapping[str, str], max_forks: int,
                 python: str = sys.executable, *, plain: bool = False,
                 sockets_dir: Path | None = None) -> None:
        self.python = python  # one zygote line per interpreter (KB_PYTHON_ENV has its own)
        self.plain = plain
        self.sockets_dir = sockets_dir
        pkg_parent = str(kernel_package().parent)
        # Our kernel package for the template: a checkout is not a site dir (and kernels see it
        # elsewhere: the child puts the kernel's own PYTHONPATH in place of this one).
        self.pythonpath = [] if pkg_parent in site.getsitepackages() else [pkg_parent]
        self.env = {**env, **TEMPLATE_ENV, "PYTHONPATH": os.pathsep.join(self.pythonpath)}
        self.max_forks = max_forks
        self.current: ZygoteProcess | None = None
        self.retired: list[ZygoteProcess] = []
        self._last_start = 0.0
        self.started = 0  # zygotes started (for tests and the bench)

    def start(self) -> None:
        """Start the first zygote (its warm-up takes about a second, in the background)."""
        self._spawn()

    def _spawn(self) -> ZygoteProcess | None:
        self._last_start = time.monotonic()
        listen = ""
        if self.sockets_dir is not None:
            kind = "keeper" if self.plain else "zygote"
            listen = str(self.sockets_dir / f"{kind}-{os.getpid()}-{next(_serial)}.sock")
        try:
            self.current = ZygoteProcess(self.env, self.python, listen=listen, plain=self.plain)
        except OSError as exc:
            log.warning("cannot start the zygote (%s); kernels start cold", exc)
            self.current = None
            return None
        self.started += 1
        return self.current

    async def _usable(self) -> ZygoteProcess:
        z = self.current
        if z is not None and z.alive and not self.plain and (z.forks >= self.max_forks or (
                z.forks and z.forks % GROWTH_CHECK_EVERY == 0 and z.grown())):
            log.info("recycling the zygote after %d forks", z.forks)
            z.retire()
            self.retired.append(z)
            z = None
        if z is None or not z.alive:
            if z is not None:
                log.warning("the %s died; kernels start cold until a new one is ready",
                            "keeper" if self.plain else "zygote")
                z.proc.poll()  # reaped if it already exited
            if time.monotonic() - self._last_start < RESTART_BACKOFF_S and z is not None:
                raise ZygoteUnavailable("the zygote died moments ago")
            z = self._spawn()
            if z is None:
                raise ZygoteUnavailable("no zygote")
        self.retired = [r for r in self.retired if r.alive]
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.shield(z.ready)
        except TimeoutError as exc:
            raise ZygoteUnavailable("the zygote is not ready") from exc
        return z

    async def fork(self, req: dict[str, Any], fds: list[int]) -> tuple[int, int, ZygoteProcess]:
        """A kernel forked per ``req`` → (host pid, pidfd, its zygote). The caller owns the
        pidfd. Raises ZygoteUnavailable (then nothing was started)."""
        z = await self._usable()
        pid, pidfd = await z.fork(req, fds)
        return pid, pidfd, z

    async def keeper(self) -> ZygoteProcess:
        """The process that spawns and holds the next kernel. Raises ZygoteUnavailable."""
        return await self._usable()

    async def close(self, keep_kernels: bool = False) -> None:
        """Stop every zygote of the line, killing their kernels; with ``keep_kernels`` only
        let go of them: they keep their kernels for the next server (``serve
        --keep-kernels``)."""
        zs = [z for z in (self.current, *self.retired) if z is not None]
        self.current = None
        self.retired = []
        await asyncio.gather(*(z.stop(keep_kernels) for z in zs), return_exceptions=True)


_serial = itertools.count(1)
