"""The kernel side of a zygote fork (``kernelspecs/_zygote.py``): enter the kernel's sandbox,
confine, take the kernel's identity and run its module as ``python -m`` would.

Imported by the zygote's template (so a fork pays nothing for it) and run only in its children.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import resource
import runpy
import signal
import sys
import time
import traceback
from typing import Any

from ._prebuilt import use_parsed

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SANDBOX_NAMESPACES = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID
                      | CLONE_NEWNET)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def confine(req: dict[str, Any]) -> None:
    """Drop every privilege, exactly as the sandbox launcher does for a cold kernel (its own
    functions: the sandbox uid and gid, no capability in any set, ``no_new_privs``), then the
    server's seccomp filter, which bubblewrap installs for a cold kernel, and the launcher's
    fail-closed check. The one place a forked kernel is confined after entering its sandbox.
    """
    from ._enter import drop_privileges, verify

    uid, gid = int(req["uid"]), int(req["gid"])
    drop_privileges(uid, gid)
    # A uid change leaves a process undumpable (its /proc files root's: no /proc/self/fd,
    # environ, mem for its own user); the cold kernel's execve made it dumpable again.
    prctl(PR_SET_DUMPABLE, 1)
    if req.get("seccomp"):
        _install_filter(bytes.fromhex(req["seccomp"]))
    verify(uid, gid)
    with open("/proc/self/status") as f:
        if "Seccomp:\t2" not in f.read() and req.get("seccomp"):
            raise RuntimeError("no seccomp filter")


def _install_filter(bpf: bytes) -> None:
    """Install a compiled seccomp BPF program (8-byte ``sock_filter`` entries)."""
    prog = ctypes.create_string_buffer(bpf, len(bpf))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(bpf) // 8, ctypes.addressof(prog))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
           "seccomp")


def enter_sandbox(req: dict[str, Any], holder: int, root: int) -> None:
    """Join the kernel's cgroups, then the holder's namespaces and root (before any thread)."""
    for procs in req.get("cgroup_procs", []):
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    _check(_libc.setns(holder, SANDBOX_NAMESPACES), "setns")
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    os.close(holder)


def _read_payload(fd: int) -> dict[str, Any]:
    """The kernel's own part of the request (its environment, client values included, and
    argv), from the memfd the server wrote in the sandbox launcher's format: read only here, in
    the kernel, so no tenant's values ever sit in the zygote's memory, which every later kernel
    starts from."""
    from ._enter import read_payload

    _uid, _gid, _cwd, command, env = read_payload(fd)
    return {"env": env, "args": command[3:], "cmdline": command}


def become_kernel(req: dict[str, Any], payload_fd: int) -> None:
    """Runs in the kernel process: confine, take the kernel's identity, run its module."""
    code = 0
    try:
        req = {**req, **_read_payload(payload_fd)}
        os.setsid()  # bwrap --new-session: no TIOCSTI into anyone's terminal
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # a kernel's stdout is banners; its stderr stays the server's log
        os.close(null)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.close(fd)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if req.get("rlimit_as"):
            cap = int(req["rlimit_as"])
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        os.chdir(req["cwd"])
        if req.get("sandboxed"):
            confine(req)
        else:  # unsandboxed kernels die with their zygote (it outlives the server)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != req["zygote"]:
                os._exit(1)
        env = {str(k): str(v) for k, v in req["env"].items()}
        os.environ.clear()
        os.environ.update(env)
        time.tzset()
        _retitle(req["cmdline"])
        _fix_paths(req, env)
        sys.argv = [req["module"], *req["args"]]
        gc.enable()
        _reseed()
        # runpy would reuse a preloaded entry module's loader, which reads the host path of
        # its source; imported afresh it is found where the sandbox shows our package.
        sys.modules.pop(req["module"], None)
        use_parsed()
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 70
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _retitle(argv: list[str]) -> None:
    """Show the kernel's own command in /proc/<pid>/cmdline (ps, psutil), not the zygote's.

    PR_SET_MM needs CAP_SYS_RESOURCE, which containers often withhold; so, as setproctitle does,
    the title is written over the zygote's argv and environ strings (contiguous at the top of
    the stack). Call after the environment was replaced: libc no longer points into them.
    """
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is stat field 3; arg_start..env_end are fields 48..51
    arg_start, arg_end, _env_start, env_end = (int(x) for x in fields[45:49])
    room = env_end - arg_start
    title = " ".join(argv).encode(errors="surrogateescape")[:room - 1]
    if len(title) < arg_end - arg_start:  # fits the argv area: a NUL-separated argv
        title = b"\0".join(a.encode(errors="surrogateescape") for a in argv)
    # Longer: the kernel reads a setproctitle-style title up to its NUL (psutil splits it).
    ctypes.memmove(arg_start, title + b"\0" * (room - len(title)), room)


def _fix_paths(req: dict[str, Any], env: dict[str, str]) -> None:
    """sys.path as ``python -m`` in the kernel's environment would have it; our kernel package
    at the path the sandbox shows it (a lazy import must find it there)."""
    ours = set(req.get("zygote_pythonpath", []))
    base = [p for p in sys.path if p and p not in ours]
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *base]
    pkg = sys.modules.get("kernelspecs")
    where = req.get("kernel_package")
    if pkg is not None and where:
        pkg.__path__[:] = [where]


def _reseed() -> None:
    # random reseeds itself after fork (os.register_at_fork); numpy's legacy global RNG does not.
    nprandom = sys.modules.get("numpy.random")
    if nprandom is not None:
        with contextlib.suppress(Exception):
            nprandom.seed()
