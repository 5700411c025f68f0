"""The zygote: a fork-server that turns one pre-imported Python into many kernels (issue 14).

Started by the server (``bridge/zygote.py``) with ``subprocess`` — never ``os.fork()`` of the
threaded server — in a clean environment, as ``python -m kernelspecs._zygote --control FD``.

* **Template.** It imports ipykernel, IPython and everything a first ``IPKernelApp.initialize()``
  and a first cell import lazily (learned by running both once in a throwaway child), works
  out what every kernel would work out again (``kernelspecs/_prebuilt.py``: the shipped
  kernelspecs' command lines parsed, the regexes that child compiled, the modules' file names
  packed onto a few pages), then ``gc.freeze()``s, so each kernel starts from copy-on-write
  pages instead of a cold import. It stays single-threaded with no zmq context and no event
  loop: all of those are made per kernel, after the fork.
* **Control.** One SOCK_SEQPACKET socket to the server: JSON requests, file descriptors by
  SCM_RIGHTS. ``fork`` answers ``{"pid": N}`` with a pidfd of the kernel, ``spawn`` (fork + exec
  of a prepared command: a cold kernel's bubblewrap, a forked kernel's sandbox holder) likewise;
  kernel exits come back as ``{"exit": pid, "status": code}``. ``retire`` stops forking; the
  zygote exits once its last kernel has. ``stop`` kills the kernels and exits.
* **Keeper** (issue 15): the zygote is the parent and reaper of every kernel it started and
  does not die with the server. End-of-file on the control socket (the server was killed,
  upgraded, stopped with ``--keep-kernels``) retires it: it keeps its kernels, answers a later
  server on its ``--listen`` socket (``adopt``: a pidfd of a kernel it still holds, or how it
  ended) and exits with its last kernel. ``--plain`` makes a keeper without a template: it
  spawns cold kernels and never forks.
* **Sandboxed child** (we spawned a bubblewrap *holder* for the kernel first): the child joins
  the kernel's cgroups first (memory is charged to whoever touches it first), enters the
  holder's namespaces with ``setns(pidfd)`` and its root with ``fchdir`` + ``chroot``; it was
  born inside the holder's PID namespace (the zygote sets it for its children for that one
  fork). The kernel drops privileges (``confine``), takes its own
  environment, reseeds, and runs its module as ``python -m`` would (``kernelspecs/_child.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import importlib
import json
import os
import re
import resource
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from . import _prebuilt
from ._child import (
    CLONE_NEWPID,
    PR_SET_CHILD_SUBREAPER,
    _check,
    _libc,
    become_kernel,
    enter_sandbox,
    prctl,
)
from ._logbudget import LineBudget

# Modules a kernel of ours runs with ``-m``; only these are forked (others start cold).
KERNEL_MODULES = ("ipykernel_launcher", "kernelspecs.bash_kernel", "kernelspecs.compiled_kernel")
PRELOAD = ("kernelspecs._enter", "zmq", "tornado.ioloop", "IPython", "jupyter_client.session",
           "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "kernelspecs._kernel",
           "kernelspecs.bash_kernel", "kernelspecs.compiled_kernel")
MAX_MSG = 1 << 20
MAX_EXITS = 4096  # exit statuses kept for a server that adopts later

# -- the template -------------------------------------------------------------------------------


def _warm_up() -> dict[str, int]:
    """Import what a kernel would import by itself, compile the patterns it would compile,
    parse the shipped kernelspecs' command lines; → how many of each."""
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    learned = _learn()
    for name in learned.get("modules", []):
        with contextlib.suppress(BaseException):
            importlib.import_module(name)
    return {"learned": len(learned.get("modules", [])),
            "patterns": _prebuilt.compile_patterns(learned.get("patterns", [])),
            "parsed": _prebuilt.parse_shipped(KERNEL_MODULES),
            "packed": _prebuilt.pack_module_files()}  # last: no import after it


def _learn() -> dict[str, Any]:
    """Start a throwaway kb-python kernel in a child (initialize, one cell) → what it had to
    import (``modules``) and compile (``patterns``) that the template lacks."""
    before, patterns = set(sys.modules), set(getattr(re, "_cache", {}))
    args = next((a for m, a in _prebuilt.shipped_commands(("ipykernel_launcher",))), [])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            null = os.open(os.devnull, os.O_RDWR)  # its banners and warnings are nobody's
            os.dup2(null, 1)
            os.dup2(null, 2)
            tmp = tempfile.mkdtemp(prefix="kb-zygote-")
            os.environ.update(HOME=tmp, IPYTHONDIR=os.path.join(tmp, ".ipython"))
            from ipykernel.kernelapp import IPKernelApp

            app = IPKernelApp.instance()
            argv = [os.path.join(tmp, "c.json") if a == _prebuilt.CONNECTION_FILE else a
                    for a in args or ["-f", _prebuilt.CONNECTION_FILE]]
            app.initialize([*argv, "--transport=ipc", f"--ip={tmp}/s"])  # type: ignore
            with contextlib.suppress(Exception):
                app.shell.run_cell("1", store_history=False, silent=True)  # type: ignore
            os.write(w, json.dumps({
                "modules": sorted(set(sys.modules) - before),
                "patterns": _prebuilt.learned_patterns(patterns)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    try:
        learned: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        learned = {}
    return learned


class Zygote:
    """The fork-server's loop. Also the *keeper* of every kernel it started (forked or spawned):
    their parent and reaper, for as long as any of them lives, whatever becomes of the server."""

    def __init__(self, control: socket.socket, listener: socket.socket | None) -> None:
        self.control: socket.socket | None = control
        self.listener = listener
        self.peers: list[socket.socket] = []  # later servers that adopted our kernels
        self.pid = os.getpid()
        self.children: set[int] = set()
        self.exited: dict[int, int] = {}  # kept for a server that adopts after the exit
        self.logs: dict[int, list[Any]] = {}  # kernels' stderr pipes → [kernel name, budget]
        # Spawns under way, answered at their exec, when their pipe reads end-of-file (the
        # loop serves other requests meanwhile): pipe → [request, asker, pid, pidfd, what was
        # read].
        self.starting: dict[int, list[Any]] = {}
        # Our own PID namespace, where children are born but for the one fork of a sandboxed
        # kernel (fork()), and its inode to check we are back in it.
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.pid_ns_ino = os.fstat(self.pid_ns).st_ino
        self.retiring = False
        self.plain = False
        self.forks = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ)
        if listener is not None:
            self.selector.register(listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)

    def send(self, msg: dict[str, Any], fds: list[int] | None = None,
             to: socket.socket | None = None) -> None:
        sock = to or self.control
        if sock is None:
            return
        with contextlib.suppress(OSError):  # a peer that went away mid-send: it is dropped
            socket.send_fds(sock, [json.dumps(msg).encode()], fds or [])

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                sock = key.fileobj
                if sock is self.listener:
                    self.accept()
                elif isinstance(sock, socket.socket):
                    self.receive(sock)
                elif sock in self.logs:
                    self.drain(int(sock))
                elif sock in self.starting:
                    self.started(int(sock))
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
            self.reap()
            if self.retiring and not self.children and not self.starting:
                self.leave()

    def accept(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            peer, _ = self.listener.accept()
            self.peers.append(peer)
            self.selector.register(peer, selectors.EVENT_READ)

    def receive(self, sock: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 8)
        except OSError:
            data, fds = b"", []
        if data:
            self.handle(json.loads(data), fds, sock)
            return
        self.selector.unregister(sock)
        sock.close()
        if sock is self.control:
            # The server is gone (killed, upgraded, stopped with --keep-kernels): its kernels
            # live on. Fork no more; keep reaping them for whoever adopts them; leave with the
            # last one.
            self.control = None
            self.retiring = True
        else:
            self.peers.remove(sock)

    def log_pipe(self, req: dict[str, Any]) -> int:
        """A pipe for the new kernel's stderr when ``req`` names a ``log``: we read it and pass
        each line to whichever server is connected (none: dropped), so the kernel never writes
        into a closed or full pipe, whatever becomes of the server. → its write end, or -1."""
        if not req.get("log"):
            return -1
        r, w = os.pipe()
        os.set_blocking(r, False)
        self.logs[r] = [str(req["log"]), LineBudget()]
        self.selector.register(r, selectors.EVENT_READ)
        return w

    def drain(self, fd: int) -> None:
        name, budget = self.logs[fd]
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        for text in budget.feed(chunk, end=not chunk):  # at most its budget (_logbudget.py)
            self.relay(name, text, budget)
        if not chunk:
            self.selector.unregister(fd)
            os.close(fd)
            del self.logs[fd]

    def relay(self, name: str, text: str, budget: LineBudget) -> None:
        """One line of a kernel's stderr to every connected server, never waiting for one: a
        server that does not keep up loses the line (counted in the next notice) rather than
        stall this loop, and with it every other kernel's start."""
        data = json.dumps({"log": name, "line": text}).encode()
        lost = False
        for sock in [self.control, *self.peers]:
            if sock is not None:
                try:
                    sock.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    lost = True
                except OSError:
                    pass  # a peer that went away: dropped when its end-of-file is read
        if lost:
            budget.lost(text)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            self.exited[pid] = code
            while len(self.exited) > MAX_EXITS:
                del self.exited[next(iter(self.exited))]
            for sock in [self.control, *self.peers]:
                if sock is not None:
                    self.send({"exit": pid, "status": code}, to=sock)

    def leave(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.listener.getsockname())
        os._exit(0)

    def stop(self) -> None:
        """Kill every kernel, reap it, and leave: the server stops and takes its kernels."""
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        self.leave()

    def handle(self, req: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
        op = req.get("op")
        try:
            if op == "retire":
                self.retiring = True
            elif op == "stop" and sock is self.control:
                self.stop()
            elif op == "stats":
                self.send({"id": req.get("id"), "forks": self.forks,
                           "children": len(self.children)}, to=sock)
            elif op == "adopt":  # a later server takes over a kernel: a pidfd, or how it ended
                pid = int(req["pid"])
                if pid in self.children:  # not reaped: the pid cannot have been reused
                    self._reply_pidfd(req, pid, sock)
                elif pid in self.exited:
                    self.send({"id": req.get("id"), "gone": pid, "status": self.exited[pid]},
                              to=sock)
                else:
                    self.send({"id": req.get("id"), "error": f"no kernel {pid} here"}, to=sock)
            elif op in ("fork", "spawn") and not self.retiring and sock is self.control:
                if op == "spawn":
                    self.spawn(req, fds, sock)  # answered at its exec
                else:
                    self._reply_pidfd(req, self.fork(req, fds), sock)
            else:
                self.send({"id": req.get("id"), "error": f"refused {op!r}"}, to=sock)
        except Exception as exc:
            self.send({"id": req.get("id"), "error": f"{type(exc).__name__}: {exc}"}, to=sock)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _reply_pidfd(self, req: dict[str, Any], pid: int, sock: socket.socket) -> None:
        pidfd = os.pidfd_open(pid)
        try:
            self.send({"id": req["id"], "pid": pid}, [pidfd], to=sock)
        finally:
            os.close(pidfd)

    def started(self, fd: int) -> None:
        """Read a spawn's pipe; at its end (the exec), answer the spawn: the pipe carries an
        exec error, or nothing: it runs."""
        req, sock, pid, pidfd, data = self.starting[fd]
        try:
            while chunk := os.read(fd, 4096):
                data += chunk
        except BlockingIOError:
            self.starting[fd][4] = data
            return
        except OSError:
            pass
        self.selector.unregister(fd)
        os.close(fd)
        del self.starting[fd]
        try:
            if data:
                self.send({"id": req.get("id"), "error": f"RuntimeError: cannot start "
                           f"{req['argv'][:1]}: {data.decode(errors='replace')}"}, to=sock)
            else:
                self.send({"id": req["id"], "pid": pid}, [pidfd], to=sock)
        finally:
            os.close(pidfd)

    def spawn(self, req: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
        """fork + exec of a prepared command (a cold kernel's bubblewrap, a forked kernel's
        sandbox holder): what ``subprocess`` with ``pass_fds`` and a preexec would do, here so
        the process is ours to reap and outlives the server. ``req["fds"]``: the descriptor
        number each received one must have in the child (the command names them)."""
        targets = [int(t) for t in req["fds"]]
        stderr = self.log_pipe(req)
        if stderr >= 0:
            fds.append(stderr)  # closed with the received ones once the child has it
            targets.append(2)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(err_r)
                self._after_fork()
                os.setsid()
                os.umask(0o022)  # bwrap makes mount points with it (see Sandbox.preexec)
                for procs in req.get("cgroup_procs", []):
                    with open(procs, "w") as f:
                        f.write(str(os.getpid()))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                if req.get("rlimit_as"):
                    cap = int(req["rlimit_as"])
                    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
                # Out of the way of every target first, then each to its number.
                low = max([*targets, *fds, 2, err_w]) + 1
                err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, low)
                moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low) for fd in fds]
                null = os.open("/dev/null", os.O_RDWR)
                for std in (0, 1, 2):
                    if std not in targets:
                        os.dup2(null, std)
                for fd, target in zip(moved, targets, strict=True):
                    os.dup2(fd, target)  # inheritable
                keep = {0, 1, 2, err_w, *targets}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                os.chdir(req.get("cwd") or "/")
                os.execve(req["executable"], req["argv"], req["env"])
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(127)
        os.close(err_w)
        self.children.add(pid)
        # Answered at the exec (end-of-file on err_r); the pidfd names it even if it dies first.
        os.set_blocking(err_r, False)
        self.starting[err_r] = [req, sock, pid, os.pidfd_open(pid), b""]
        self.selector.register(err_r, selectors.EVENT_READ)

    def fork(self, req: dict[str, Any], fds: list[int]) -> int:
        if self.plain:
            raise RuntimeError("a keeper without a template does not fork")
        if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
            raise RuntimeError("zygote is not single-threaded; refusing to fork")
        req["zygote"] = self.pid
        self.forks += 1
        # Descriptors by name: [holder, root] when sandboxed, [stderr], then the payload.
        named = dict(zip(req["fds"], fds, strict=True))
        stderr, payload = self.log_pipe(req), named["payload"]
        if stderr < 0:
            stderr = named.get("stderr", -1)
        else:
            fds.append(stderr)  # closed with the received ones once the child has it
        if not req.get("sandboxed"):
            pid = os.fork()
            if pid == 0:
                self._after_fork()
                if stderr >= 0:
                    os.dup2(stderr, 2)
                for procs in req.get("cgroup_procs", []):
                    with open(procs, "w") as f:
                        f.write(str(os.getpid()))
                become_kernel(req, payload)
            self.children.add(pid)
            return pid
        holder, root = named["holder"], named["root"]
        # The kernel is born in its sandbox's PID namespace: made ours for children for this
        # one fork, then ours again. (A go-between child that forked the kernel cost a fork and
        # an exit of the whole template per kernel, and held this loop until it was done.)
        _check(_libc.setns(holder, CLONE_NEWPID), "setns")
        try:
            pid = os.fork()
        finally:
            if os.getpid() == self.pid:
                self._own_pid_namespace()
        if pid == 0:  # joins the sandbox (cgroups, namespaces, root), confines, runs
            try:
                self._after_fork()
                if stderr >= 0:
                    os.dup2(stderr, 2)
                enter_sandbox(req, holder, root)
                become_kernel(req, payload)
            except BaseException:
                traceback.print_exc()
            os._exit(70)  # the server sees it exit before it listens: it starts it cold
        self.children.add(pid)
        return pid

    def _own_pid_namespace(self) -> None:
        """Children are born in our PID namespace again, or we stop: a later child born in a
        tenant's namespace must never happen."""
        try:
            _check(_libc.setns(self.pid_ns, CLONE_NEWPID), "setns")
            back = os.stat("/proc/self/ns/pid_for_children").st_ino == self.pid_ns_ino
        except OSError:
            back = False
        if not back:
            sys.stderr.write("kernel-bridge zygote: cannot return to its PID namespace\n")
            self.stop()

    def _after_fork(self) -> None:
        """In a child: give back the zygote's signals and file descriptors."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        self.selector.close()
        for sock in [self.control, self.listener, *self.peers]:
            if sock is not None:
                sock.close()
        for fd in [*self.logs, *self.starting]:
            os.close(fd)
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.pid_ns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kernelspecs._zygote")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--listen", default="", help="socket path where a later server adopts")
    parser.add_argument("--plain", action="store_true", help="a keeper: spawns, never forks")
    args = parser.parse_args(argv)
    # No PR_SET_PDEATHSIG: kernels outlive the server (issue 15), and we are their parent.
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    if sys.path and sys.path[0] == os.getcwd():
        del sys.path[0]  # python -m put our cwd first; a kernel gets its own (_fix_paths)
    control = socket.socket(fileno=args.control)
    started = time.monotonic()
    learned: dict[str, int] = {}
    if not args.plain:
        learned = _warm_up()
        gc.collect()
        gc.freeze()
        gc.disable()
    listener = None
    if args.listen:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.listen)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)  # root's alone, like the IPC root it lives in
        try:
            listener.bind(args.listen)
        finally:
            os.umask(old)
        listener.listen(8)
    zygote = Zygote(control, listener)
    zygote.plain = args.plain
    zygote.send({"ready": True, "pid": os.getpid(), "modules": len(sys.modules),
                 **learned, "warm_up_s": round(time.monotonic() - started, 3)})
    zygote.serve()

if __name__ == "__main__":
    main()
