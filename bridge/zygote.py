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
root (:mod:`bridge.keeper`). Nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import site
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .keeper import Keeper, ZygoteUnavailable

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
RESTART_BACKOFF_S = 5.0
GROWTH_LIMIT_BYTES = 48 * 1024 * 1024  # the template's own private growth that retires it
GROWTH_CHECK_EVERY = 25
KEEPER = ""  # the plain keeper's key among the server's lines (zygote lines: an interpreter)


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
