"""A kernel provisioner whose Python kernels are forked by the zygote instead of exec'd.

:class:`ZygoteProvisioner` is the sandbox provisioner (same cgroup, caps, environment, restart
and cleanup rules) with one difference in ``launch_kernel``: when the kernel command is one the
zygote can fork (:func:`bridge.zygote.forkable`), it

1. starts the kernel's sandbox with a *holder* as its payload — the very
   ``Sandbox.host_launch`` a cold kernel gets (bubblewrap, the launcher dropping to the sandbox
   uid), in the kernel's cgroups — and waits until the holder runs (every namespace and mount is
   set up by then);
2. hands the zygote a pidfd of the sandbox and its root, and a memfd with what holds client
   values (environment, argv) that only the kernel reads; the zygote's child joins the cgroups,
   the namespaces and the root, forks the kernel inside, which confines itself with the
   launcher's own functions plus the seccomp filter (``kernelspecs/_zygote.py``);
3. keeps the kernel's pidfd: ``poll``/``wait``/``send_signal``/``kill`` go through it, and the
   holder is the kill switch (when it goes, bubblewrap's PID namespace and the kernel go too).

Anything that fails before the kernel listens — no zygote, a dead one, a refused fork, a forked
kernel that exits while starting — kills the
holder and whatever entered the cgroup, then starts the kernel cold, as the sandbox provisioner
would. The server's death takes the holders (``--die-with-parent``) and the zygote
(``PR_SET_PDEATHSIG``) with it, so no kernel outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shlex
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

from jupyter_client.connect import KernelConnectionInfo

from .provisioner import SandboxProvisioner
from .sandbox import KERNEL_MODULES, RLIMIT_AS_SLACK, WORKDIR
from .zygote import Zygotes, ZygoteUnavailable, forkable, kernel_package

log = logging.getLogger(__name__)

# The sandbox's payload while a forked kernel lives in it: says it runs, then waits.
HOLDER = ["/bin/sh", "-c", "echo; exec sleep infinity"]
HOLDER_ENV = {"PATH": "/usr/bin:/bin"}
HOLDER_TIMEOUT_S = 10.0
# A pidfd reads ready once the process has exited; the zygote's exit report follows shortly.
EXIT_REPORT_WAIT_S = 0.5
KILLED = -signal.SIGKILL
LISTEN_POLL_S = 0.002
LISTEN_TIMEOUT_S = 30.0


class ZygoteProvisioner(SandboxProvisioner):
    zygote_lines: Mapping[str, Zygotes] | None = None  # per interpreter
    zygotes: Zygotes | None = None  # the line of the running kernel's interpreter
    forked = False  # whether the running kernel came from the zygote
    _pidfd: int | None = None
    _holder: subprocess.Popen[bytes] | None = None
    _exit: int | None = None

    @property
    def has_process(self) -> bool:
        return self._pidfd is not None or super().has_process

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        km = self.parent
        raw = km.format_kernel_cmd() if km is not None else list(cmd)
        self.forked = False
        self._exit = None
        self.zygotes = (self.zygote_lines or {}).get(raw[0]) if raw else None
        if self.zygotes is not None and forkable(raw, self.confinement.environ,
                                                 self.zygotes.python):
            try:
                await self._fork(raw, kwargs)
                self.forked = True
                if self.stderr is not None:  # the kernel has its copy of the relay's pipe
                    self.stderr.launched()
                return self.connection_info
            except ZygoteUnavailable as exc:
                log.info("kernel %s starts cold: %s", self.kernel_id, exc)
                await self._abandon()
        info: KernelConnectionInfo = await super().launch_kernel(cmd, **kwargs)
        return info

    # -- the forked path ------------------------------------------------------------------------

    async def _fork(self, raw: list[str], kwargs: dict[str, Any]) -> None:
        assert self.zygotes is not None
        sandbox, conf = self.sandbox, self.confinement
        # The kernel's own environment (client values included): applied only inside, by the
        # kernel, after it dropped its privileges (the provisioner's kwargs hold the host's).
        env = sandbox.kernel_environ(conf)
        env.pop("JPY_PARENT_PID", None)  # no parent poller: the holder and cgroup kill govern
        # What holds client values goes in a memfd that only the kernel reads (_payload).
        payload = {"env": env, "args": raw[3:], "cmdline": raw}
        req: dict[str, Any] = {
            "module": raw[2],
            "sandboxed": sandbox.enabled,
            "cwd": WORKDIR if sandbox.enabled else str(conf.workdir),
            "cgroup_procs": [] if self.cgroup is None else [
                str(d / "cgroup.procs") for d in dict.fromkeys(self.cgroup.dirs.values())],
            "rlimit_as": conf.mem_bytes + RLIMIT_AS_SLACK
            if sandbox.enabled and self.cgroup is None and conf.mem_bytes else 0,
            "zygote_pythonpath": self.zygotes.pythonpath,
            "kernel_package": self._package_in_sandbox(),
            # The cold kernel's confinement from the sandbox launcher: its uid and seccomp.
            "uid": sandbox.uid, "gid": sandbox.gid,
            "seccomp": sandbox.seccomp_bpf.hex() if sandbox.enabled else "",
        }
        fds: list[int] = []
        if sandbox.enabled:
            fds = await self._start_holder()
        # The kernel's stderr: the relay's pipe when the provisioner has one, else the server's.
        err = kwargs.get("stderr")
        relay = [err] if isinstance(err, int) and err >= 0 else []
        try:
            fds.append(_memfd(json.dumps(payload).encode()))
            req["fds"] = [*(["holder", "root"] if sandbox.enabled else []),
                          *(["stderr"] if relay else []), "payload"]
            pid, pidfd, _z = await self.zygotes.fork(req, [*fds[:-1], *relay, fds[-1]])
        finally:
            for fd in fds:
                os.close(fd)
        self._pidfd = pidfd
        self.pid = pid
        self.pgid = pid  # the kernel leads its own session
        self.cwd = kwargs.get("cwd")
        await self._listening()

    async def _listening(self) -> None:
        """Return once the kernel has bound its sockets. A client that connects earlier waits
        out zmq's reconnect interval and may miss the first iopub status: ~0.3 s per start."""
        info = self.connection_info
        if info.get("transport") != "ipc":
            return
        paths = [f"{info['ip']}-{info[p]}" for p in
                 ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]
        assert self._pidfd is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LISTEN_TIMEOUT_S
        while not all(os.path.exists(p) for p in paths):
            if _exited(self._pidfd):  # a forked kernel that cannot start: start it cold
                raise ZygoteUnavailable("the forked kernel exited while starting")
            if loop.time() > deadline:
                return  # the client's readiness wait reports it
            await asyncio.sleep(LISTEN_POLL_S)

    def _package_in_sandbox(self) -> str:
        pkg = str(kernel_package())
        if not self.sandbox.enabled:
            return pkg
        for b in self.sandbox.binds:
            if b.src == pkg:
                return b.dest
        return pkg if pkg.startswith(tuple(b.src + "/" for b in self.sandbox.binds)) \
            else f"{KERNEL_MODULES}/{os.path.basename(pkg)}"

    async def _start_holder(self) -> list[int]:
        """The kernel's sandbox with the holder in it → [pidfd, root dir fd] of the sandbox."""
        launch = self.sandbox.host_launch(list(HOLDER), self.confinement, HOLDER_ENV)
        argv = list(launch.argv)  # argv[0] is "bwrap": the sandbox's pid 1 shows no path
        env, keep = dict(launch.env), list(launch.fds)
        # The shell below finds that bwrap where the sandbox chose it, and nowhere else.
        env["PATH"] = os.pathsep.join([os.path.dirname(launch.executable),
                                       env.get("PATH", "")]).rstrip(os.pathsep)
        info_r, info_w = os.pipe()
        try:
            argv[1:1] = ["--info-fd", str(info_w)]
            # Popen, not asyncio's subprocess: without a preexec_fn it spawns with vfork, and
            # asyncio's child watcher would keep a thread per holder for the kernel's life.
            self._holder = subprocess.Popen(
                self._in_cgroup(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                env=env, pass_fds=(info_w, *keep))
            os.close(info_w)
            info_w = -1
            assert self._holder.stdout is not None
            async with asyncio.timeout(HOLDER_TIMEOUT_S):
                line = await _read_line(self._holder.stdout.fileno())
            self._holder.stdout.close()
            if not line:
                raise ZygoteUnavailable("the sandbox did not start")
            child = int(json.loads(_read_json(info_r))["child-pid"])
            pidfd = os.pidfd_open(child)
            try:
                root = os.open(f"/proc/{child}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                os.close(pidfd)
                raise
            if _exited(pidfd):  # the pid was reused after the sandbox died: not ours
                os.close(pidfd)
                os.close(root)
                raise ZygoteUnavailable("the sandbox died while starting")
            return [pidfd, root]
        except (OSError, ValueError, KeyError, TimeoutError) as exc:
            raise ZygoteUnavailable(f"the sandbox did not start: {exc}") from exc
        finally:
            os.close(info_r)
            if info_w >= 0:
                os.close(info_w)
            launch.close()  # the child has its copies (or there is no child)

    def _in_cgroup(self, argv: list[str]) -> list[str]:
        """``argv`` behind a shell that joins the kernel's cgroups and sets its rlimits, then
        execs it. What a preexec_fn would do, but without one: a preexec_fn forces a full fork
        of the server and blocks its event loop until the child execs (~20 ms a start)."""
        steps = [f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}"
                 for d in ([] if self.cgroup is None else dict.fromkeys(self.cgroup.dirs.values()))]
        steps.append("ulimit -c 0")
        conf = self.confinement
        if self.cgroup is None and conf.mem_bytes:
            steps.append(f"ulimit -v {(conf.mem_bytes + RLIMIT_AS_SLACK) // 1024}")
        return ["/bin/sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh", *argv]

    async def _abandon(self) -> None:
        """Leave nothing of a forked start that failed: no holder, nothing in the cgroup."""
        await self._stop_holder()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        if self.cgroup is not None:
            self.cgroup.kill()
        self.pid = None

    async def _stop_holder(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        if holder.stdout is not None:
            holder.stdout.close()
        for _ in range(200):  # bwrap exits at once on SIGKILL; reap it without a thread
            if holder.poll() is not None:
                return
            await asyncio.sleep(0.01)
        log.warning("the sandbox holder of kernel %s did not exit", self.kernel_id)

    # -- process control ------------------------------------------------------------------------

    async def poll(self) -> int | None:
        if self._pidfd is None:
            return self._exit if self.forked else await super().poll()
        if not _exited(self._pidfd):
            return None
        return await self._reaped()

    async def _reaped(self) -> int:
        assert self.zygotes is not None and self.pid is not None
        if self._exit is not None:
            return self._exit
        code = self.zygotes.exit_status(self.pid)
        for _ in range(int(EXIT_REPORT_WAIT_S / 0.01)):
            if code is not None:
                break
            await asyncio.sleep(0.01)
            code = self.zygotes.exit_status(self.pid)
        self._exit = KILLED if code is None else code
        return self._exit

    async def wait(self) -> int | None:
        if self._pidfd is None:
            return self._exit if self.forked else await super().wait()
        pidfd = self._pidfd
        if not _exited(pidfd):
            await _readable(pidfd)
        code = await self._reaped()
        os.close(pidfd)
        self._pidfd = None
        return code

    async def send_signal(self, signum: int) -> None:
        if self._pidfd is None:
            if not self.forked:
                await super().send_signal(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    async def kill(self, restart: bool = False) -> None:
        if self._pidfd is None and not self.forked:
            await super().kill(restart=restart)
            return
        await self.send_signal(signal.SIGKILL)
        await self._stop_holder()  # takes the sandbox's PID namespace down with it

    async def terminate(self, restart: bool = False) -> None:
        if self._pidfd is None and not self.forked:
            await super().terminate(restart=restart)
            return
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        await self._stop_holder()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        await super().cleanup(restart=restart)


def _memfd(data: bytes) -> int:
    """An in-memory file holding ``data``, positioned at its start."""
    fd = os.memfd_create("kb-kernel", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _exited(pidfd: int) -> bool:
    poller = select.poll()  # not select(): a busy server's descriptors pass 1024
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def _readable(fd: int) -> None:
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
        await _readable(fd)
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
