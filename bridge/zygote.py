"""The server's side of the zygote (``kernelspecs/_zygote.py``): start it, ask it for kernels,
learn how they ended, recycle it.

One :class:`Zygotes` per server. It keeps one *current* zygote that takes forks and the retired
ones that still reap kernels they forked (a retired zygote exits once its last kernel has).
The current one is replaced after ``max_forks`` forks (its children share one hash secret,
ASLR layout and stack canary) or once its own memory has grown (what it dirtied is no longer
shared with new kernels). If it dies, forks fail with :class:`ZygoteUnavailable` and the caller
cold-starts; a new one is started at most every ``RESTART_BACKOFF_S``.

Talking to it is one SOCK_SEQPACKET socketpair: JSON messages, file descriptors by SCM_RIGHTS,
read on the event loop (``add_reader``); nothing here blocks.
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
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


class ZygoteUnavailable(RuntimeError):
    """No zygote can fork this kernel now; start it cold."""


def for_interpreters(env: Mapping[str, str], max_forks: int,
                     pythons: list[str]) -> dict[str, Zygotes]:
    """A zygote line per interpreter kernels start with: the server's own, and an operator's
    Python environment when our kernel package can be put on its path without the server's
    site-packages (a checkout): a foreign interpreter must not import the server's packages."""
    pkg_parent = str(kernel_package().parent)
    lines = {}
    for python in dict.fromkeys(pythons):
        if python == sys.executable or pkg_parent not in site.getsitepackages():
            lines[python] = Zygotes(env, max_forks, python)
    return lines


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


class ZygoteProcess:
    """One running zygote: its process, its socket and what it told us."""

    def __init__(self, env: Mapping[str, str], python: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "kernelspecs._zygote", "--control", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=dict(env), cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        self.sock.setblocking(False)
        self.pid = self.proc.pid
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.replies: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self.exits: dict[int, int] = {}
        self.forks = 0
        self.baseline = 0
        self.retired = False
        loop.add_reader(self.sock.fileno(), self._readable)

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
        if "exit" in msg:
            self.exits[int(msg["exit"])] = int(msg["status"])
            while len(self.exits) > MAX_UNCLAIMED_EXITS:  # kernels nobody polled after a kill
                del self.exits[next(iter(self.exits))]
        elif msg.get("ready"):
            with contextlib.suppress(OSError):
                self.baseline = private_bytes(self.pid)
            if not self.ready.done():
                self.ready.set_result(msg)
        elif "id" in msg:
            fut = self.replies.pop(int(msg["id"]), None)
            if fut is None or fut.done():
                for fd in fds:  # a fork whose asker gave up: it must not run unowned
                    _kill(fd)
            elif "pid" in msg and fds:
                fut.set_result((int(msg["pid"]), fds[0]))
            else:
                for fd in fds:
                    os.close(fd)
                fut.set_exception(ZygoteUnavailable(msg.get("error", "no pid")))

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
        self._reap()

    def _reap(self, tries: int = 100) -> None:
        """Reap the exited zygote without blocking the loop (it exits just after its socket
        closes)."""
        if self.proc.poll() is None and tries > 0:
            asyncio.get_running_loop().call_later(0.05, self._reap, tries - 1)

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

    async def fork(self, req: dict[str, Any], fds: list[int], rid: int) -> tuple[int, int]:
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        self.forks += 1
        done = False
        try:
            self.send({**req, "op": "fork", "id": rid}, fds)
            async with asyncio.timeout(FORK_TIMEOUT_S):
                result = await fut
            done = True
            return result
        except TimeoutError as exc:
            raise ZygoteUnavailable("the zygote did not answer") from exc
        finally:
            self.replies.pop(rid, None)
            if not done and fut.done() and not fut.cancelled() and fut.exception() is None:
                _kill(fut.result()[1])  # forked, but nobody is left to take it

    def retire(self) -> None:
        self.retired = True
        with contextlib.suppress(ZygoteUnavailable):
            self.send({"op": "retire"})

    def grown(self) -> bool:
        try:
            return private_bytes(self.pid) - self.baseline > GROWTH_LIMIT_BYTES
        except OSError:
            return False

    async def stop(self) -> None:
        if self.alive:
            self._gone()  # closing our end: the zygote kills what it still holds and exits
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.proc.wait, 5)


class Zygotes:
    """The server's zygotes: forks kernels, knows their exit codes, recycles and restarts."""

    def __init__(self, env: Mapping[str, str], max_forks: int,
                 python: str = sys.executable) -> None:
        self.python = python  # one zygote line per interpreter (KB_PYTHON_ENV has its own)
        pkg_parent = str(kernel_package().parent)
        # Our kernel package for the template: a checkout is not a site dir (and kernels see it
        # elsewhere: the child puts the kernel's own PYTHONPATH in place of this one).
        self.pythonpath = [] if pkg_parent in site.getsitepackages() else [pkg_parent]
        self.env = {**env, **TEMPLATE_ENV, "PYTHONPATH": os.pathsep.join(self.pythonpath)}
        self.max_forks = max_forks
        self.current: ZygoteProcess | None = None
        self.retired: list[ZygoteProcess] = []
        self._ids = itertools.count(1)
        self._last_start = 0.0
        self.started = 0  # zygotes started (for tests and the bench)

    def start(self) -> None:
        """Start the first zygote (its warm-up takes about a second, in the background)."""
        self._spawn()

    def _spawn(self) -> ZygoteProcess | None:
        self._last_start = time.monotonic()
        try:
            self.current = ZygoteProcess(self.env, self.python)
        except OSError as exc:
            log.warning("cannot start the zygote (%s); kernels start cold", exc)
            self.current = None
            return None
        self.started += 1
        return self.current

    async def _usable(self) -> ZygoteProcess:
        z = self.current
        if z is not None and z.alive and (z.forks >= self.max_forks or (
                z.forks and z.forks % GROWTH_CHECK_EVERY == 0 and z.grown())):
            log.info("recycling the zygote after %d forks", z.forks)
            z.retire()
            self.retired.append(z)
            z = None
        if z is None or not z.alive:
            if z is not None:
                log.warning("the zygote died; kernels start cold until a new one is ready")
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
        pid, pidfd = await z.fork(req, fds, next(self._ids))
        return pid, pidfd, z

    def exit_status(self, pid: int) -> int | None:
        for z in (self.current, *self.retired):
            if z is not None and pid in z.exits:
                return z.exits.pop(pid)
        return None

    async def close(self) -> None:
        zs = [z for z in (self.current, *self.retired) if z is not None]
        self.current = None
        self.retired = []
        await asyncio.gather(*(z.stop() for z in zs), return_exceptions=True)
