"""How the sandbox provisioner has a keeper start a kernel: spawned cold, or forked from a zygote.

* **Spawned** (any kernel): the command :meth:`Sandbox.host_launch` built — bubblewrap and its
  descriptors — is exec'd by the plain keeper, which joins the kernel's cgroups and sets its
  rlimits first (what :meth:`Sandbox.preexec` does for a server child).
* **Forked** (a kernel a zygote can stand in for, :func:`bridge.zygote.forkable`):

  1. the plain keeper spawns the kernel's sandbox with a *holder* as its payload (a
     :class:`Nest`) — the very sandbox a cold kernel gets, holding it with setpriv, sh and
     sleep instead of the Python launcher — and we wait until the holder runs (every namespace
     and mount is set up by then);
  2. the zygote gets a pidfd of the sandbox and its root, and the memfd with the kernel's
     command and environment (client values) in the launcher's format, that only the kernel
     reads; its child joins the cgroups, the namespaces and the root, forks the kernel inside,
     which confines itself with the launcher's own functions plus the seccomp filter;
  3. the holder is the kill switch: when it goes, bubblewrap's PID namespace and the kernel go.

Either way the keeper is the kernel's parent and reaper and hands us a pidfd of it. Anything
that fails before the kernel listens raises ZygoteUnavailable; the provisioner then cleans up
and starts the kernel another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .keeper import Keeper, ZygoteUnavailable, reach
from .sandbox import KERNEL_MODULES, WORKDIR
from .zygote import Zygotes, kernel_package

if TYPE_CHECKING:
    from .provisioner import SandboxProvisioner

HOLDER_TIMEOUT_S = 10.0
LISTEN_POLL_S = 0.002
LISTEN_TIMEOUT_S = 30.0
IN_MOVED_TO = 0x80  # inotify(7)
IN_CREATE = 0x100
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (of the name that follows)
_libc = ctypes.CDLL(None, use_errno=True)


async def spawn(prov: SandboxProvisioner, line: Zygotes, cmd: list[str],
                kwargs: dict[str, Any]) -> tuple[Keeper, int, int]:
    """The prepared cold launch (``kwargs`` from the provisioner's pre_launch), exec'd by the
    plain keeper → (keeper, pid, pidfd)."""
    assert prov.sandbox is not None and prov.confinement is not None
    keeper = await line.keeper()
    fds = list(kwargs.get("pass_fds", ()))
    req = _spawn_request(prov, cmd, str(kwargs.get("executable") or cmd[0]),
                         dict(kwargs.get("env") or {}), str(kwargs.get("cwd") or "/"), fds)
    req["log"] = str(prov.kernel_id)  # its stderr: read by the keeper, relayed to us
    pid, pidfd = await keeper.start("spawn", req, fds)
    return keeper, pid, pidfd


def _spawn_request(prov: SandboxProvisioner, argv: list[str], executable: str,
                   env: Mapping[str, str], cwd: str, targets: list[int]) -> dict[str, Any]:
    assert prov.sandbox is not None and prov.confinement is not None
    cg = prov.cgroup
    return {"argv": argv, "executable": executable, "env": dict(env), "cwd": cwd,
            "cgroup_procs": [] if cg is None else [
                str(d / "cgroup.procs") for d in dict.fromkeys(cg.dirs.values())],
            "rlimit_as": prov.sandbox.rlimit_as(prov.confinement, cg), "fds": targets}


async def fork(prov: SandboxProvisioner, line: Zygotes, raw: list[str],
               nests: Zygotes | None) -> tuple[Keeper, int, int]:
    """A kernel forked by ``line``'s zygote into a sandbox of its own → (zygote, pid, pidfd).
    Sets ``prov.nest`` (the sandbox holder, spawned by the plain keeper ``nests``: a small
    process forks in a fraction of the template's time, and the zygote's one loop stays free
    for forks) when sandboxed."""
    sandbox, conf = prov.sandbox, prov.confinement
    assert sandbox is not None and conf is not None
    zygote = await line.keeper()
    req: dict[str, Any] = {
        "module": raw[2],
        "sandboxed": sandbox.enabled,
        "cwd": WORKDIR if sandbox.enabled else str(conf.workdir),
        "cgroup_procs": [] if prov.cgroup is None else [
            str(d / "cgroup.procs") for d in dict.fromkeys(prov.cgroup.dirs.values())],
        "rlimit_as": sandbox.rlimit_as(conf, prov.cgroup),
        "zygote_pythonpath": line.pythonpath,
        "kernel_package": _package_in_sandbox(prov),
        # The cold kernel's confinement from the sandbox launcher: its uid and seccomp.
        "uid": sandbox.uid, "gid": sandbox.gid,
        "seccomp": sandbox.seccomp_bpf.hex() if sandbox.enabled else "",
    }
    fds: list[int] = []
    if sandbox.enabled:
        prov.nest = await Nest.start(prov, zygote if nests is None else await nests.keeper())
        fds = prov.nest.entry()
    # The kernel's own environment: applied only inside, by the kernel, after it dropped its
    # privileges. No parent poller (JPY_PARENT_PID): the keeper and the cgroup kill govern.
    env = sandbox.kernel_environ(conf)
    env.pop("JPY_PARENT_PID", None)
    req["log"] = str(prov.kernel_id)  # its stderr: read by the zygote, relayed to us
    try:
        fds.append(sandbox.payload_fd(raw, env))
        req["fds"] = [*(["holder", "root"] if sandbox.enabled else []), "payload"]
        pid, pidfd = await zygote.fork(req, fds)
    except ValueError as exc:  # a variable execve cannot carry: the cold start says so
        raise ZygoteUnavailable(str(exc)) from exc
    finally:
        for fd in fds:
            os.close(fd)
    return zygote, pid, pidfd


def _package_in_sandbox(prov: SandboxProvisioner) -> str:
    pkg = str(kernel_package())
    sandbox = prov.sandbox
    assert sandbox is not None
    if not sandbox.enabled:
        return pkg
    for b in sandbox.binds:
        if b.src == pkg:
            return b.dest
    return pkg if pkg.startswith(tuple(b.src + "/" for b in sandbox.binds)) \
        else f"{KERNEL_MODULES}/{os.path.basename(pkg)}"


class Nest:
    """A forked kernel's sandbox: bubblewrap running the holder (:meth:`Sandbox.holder_launch`:
    no Python, not the tenant's uid), spawned by a keeper (so it, too, outlives the server)."""

    def __init__(self, keeper: Keeper, pid: int, pidfd: int) -> None:
        self.keeper, self.pid, self.pidfd = keeper, pid, pidfd
        self.inner: list[int] = []  # [pidfd, root dir fd] of the sandbox's pid 1, while forking

    @classmethod
    async def start(cls, prov: SandboxProvisioner, keeper: Keeper) -> Nest:
        sandbox, conf = prov.sandbox, prov.confinement
        assert sandbox is not None and conf is not None
        launch = sandbox.holder_launch(conf)
        info_r, info_w = os.pipe()
        out_r, out_w = os.pipe()
        nest: Nest | None = None
        try:
            argv = list(launch.argv)  # argv[0] is "bwrap": the sandbox's pid 1 shows no path
            argv[1:1] = ["--info-fd", str(info_w)]
            fds = [*launch.fds, info_w, out_w]
            req = _spawn_request(prov, argv, launch.executable, launch.env, "/",
                                 [*launch.fds, info_w, 1])
            req["log"] = f"{prov.kernel_id} (sandbox)"  # bubblewrap's own complaints
            pid, pidfd = await keeper.start("spawn", req, fds)
            nest = cls(keeper, pid, pidfd)
            os.close(info_w)
            os.close(out_w)
            info_w = out_w = -1
            async with asyncio.timeout(HOLDER_TIMEOUT_S):
                line = await _read_line(out_r)
            if not line:
                raise ZygoteUnavailable("the sandbox did not start")
            child = int(json.loads(_read_json(info_r))["child-pid"])
            inner = os.pidfd_open(child)
            try:
                root = os.open(f"/proc/{child}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                os.close(inner)
                raise
            nest.inner = [inner, root]
            if exited(inner):  # the pid was reused after the sandbox died: not ours
                raise ZygoteUnavailable("the sandbox died while starting")
            return nest
        except (OSError, ValueError, KeyError, TimeoutError, ZygoteUnavailable) as exc:
            if nest is not None:
                await nest.release(kill=True)
            if isinstance(exc, ZygoteUnavailable):
                raise
            raise ZygoteUnavailable(f"the sandbox did not start: {exc}") from exc
        finally:
            for fd in (info_r, info_w, out_r, out_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            launch.close()  # the holder has its copies (or there is none)

    def entry(self) -> list[int]:
        """The descriptors a fork enters the sandbox by (the caller closes them)."""
        fds, self.inner = self.inner, []
        return fds

    @classmethod
    async def adopt(cls, handle: Mapping[str, Any], pid: int) -> Nest | None:
        with contextlib.suppress(ZygoteUnavailable):
            keeper = await reach(handle)
            pidfd, _status = await keeper.adopt(pid)
            if pidfd is not None:
                return cls(keeper, pid, pidfd)
        return None

    async def release(self, kill: bool) -> None:
        for fd in self.entry():
            os.close(fd)
        if self.pidfd < 0:
            return
        if kill:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            for _ in range(200):  # bwrap exits at once on SIGKILL
                if exited(self.pidfd):
                    break
                await asyncio.sleep(0.01)
            self.keeper.exit_status(self.pid)  # not a kernel's: nobody else claims it
        self.detach()

    def detach(self) -> None:
        for fd in self.entry():
            os.close(fd)
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


async def listening(info: Mapping[str, Any], pidfd: int, *, raise_on_exit: bool) -> None:
    """Return once the kernel has bound its sockets. A client that connects earlier waits
    out zmq's reconnect interval and may miss the first iopub status: ~0.3 s per start.
    A kernel that exits first: ZygoteUnavailable with ``raise_on_exit``, else return.

    Woken by inotify when an entry appears in the sockets' dir, or by the kernel's exit (a
    2 ms poll was ~60 turns of the event loop per start); polled without inotify."""
    if info.get("transport") != "ipc":
        return
    paths = [f"{info['ip']}-{info[p]}" for p in
             ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LISTEN_TIMEOUT_S
    watches = _SocketWatches.of(loop)
    # Before the first look, so no entry is missed.
    wd, woke = watches.add(os.path.dirname(paths[0]))
    loop.add_reader(pidfd, woke.set)
    try:
        while not all(os.path.exists(p) for p in paths):
            if exited(pidfd):
                if raise_on_exit:  # a forked kernel that cannot start: started another way
                    raise ZygoteUnavailable("the kernel exited while starting")
                return
            left = deadline - loop.time()
            if left <= 0:
                return  # the client's readiness wait reports it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woke.wait(), left if wd >= 0 else LISTEN_POLL_S)
            woke.clear()
    finally:
        loop.remove_reader(pidfd)
        watches.remove(wd)


class _SocketWatches:
    """One inotify descriptor per event loop, a watch per kernel being waited for. Closing an
    inotify descriptor waits out a kernel grace period (~9 ms, the event loop standing still),
    while adding and removing a watch take microseconds."""

    _current: _SocketWatches | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fd = int(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        self.woken: dict[int, asyncio.Event] = {}
        if self.fd >= 0:
            loop.add_reader(self.fd, self._read)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _SocketWatches:
        current = cls._current
        if current is None or current.loop is not loop:
            if current is not None and current.fd >= 0 and current.loop.is_closed():
                os.close(current.fd)
            current = cls._current = cls(loop)
        return current

    def add(self, directory: str) -> tuple[int, asyncio.Event]:
        """A watch on ``directory`` and the event its new entries set (-1: no watch)."""
        wd = -1
        if self.fd >= 0:
            wd = int(_libc.inotify_add_watch(self.fd, os.fsencode(directory),
                                             IN_CREATE | IN_MOVED_TO))
        return wd, self.woken.setdefault(wd, asyncio.Event()) if wd >= 0 else asyncio.Event()

    def remove(self, wd: int) -> None:
        if wd >= 0 and self.woken.pop(wd, None) is not None:
            _libc.inotify_rm_watch(self.fd, wd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return
        at = 0
        while at + INOTIFY_EVENT.size <= len(data):  # struct inotify_event, then its name
            wd, _mask, _cookie, size = INOTIFY_EVENT.unpack_from(data, at)
            at += INOTIFY_EVENT.size + size
            # wd -1: the queue overflowed (IN_Q_OVERFLOW), anyone may have missed an entry
            for woke in self.woken.values() if wd == -1 else [self.woken.get(wd)]:
                if woke is not None:
                    woke.set()


def exited(pidfd: int) -> bool:
    poller = select.poll()  # not select(): a busy server's descriptors pass 1024
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def readable(fd: int) -> None:
    """Wait until ``fd`` (a pipe, a pidfd) reads ready, on the event loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _read_line(fd: int) -> bytes:
    """One line from a pipe, read on the event loop; b"" at end-of-file."""
    os.set_blocking(fd, False)
    data = b""
    while not data.endswith(b"\n"):
        await readable(fd)
        chunk = os.read(fd, 256)
        if not chunk:
            return b""
        data += chunk
    return data


def _read_json(fd: int) -> str:
    """bubblewrap's --info-fd JSON (written whole before the payload runs)."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = b""
        if not chunk:
            raise ValueError(f"incomplete sandbox info {data!r}")
        data += chunk
        with contextlib.suppress(ValueError):
            json.loads(data)
            return data.decode()
