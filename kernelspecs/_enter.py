"""The first process inside a kernel's sandbox: drop to the sandbox uid, then become the kernel.

    python -I -S _enter.py FD

``FD`` holds NUL-separated fields: uid, gid, working dir, argc, the kernel's argv, then its
environment as ``NAME=value`` pairs (no JSON: importing it would cost this start-up ~7 ms).

bubblewrap starts this as root of the host (bwrap runs privileged, without a user namespace)
holding only CAP_SETUID, CAP_SETGID and CAP_SETPCAP, with ``no_new_privs`` and the seccomp filter
already in force, and with the fixed environment the server gave bwrap: nothing a client sent
has reached any process yet. Here:

1. the kernel's command and environment (the client's variables merged in) are read from
   ``FD``, a memfd the server wrote, and every other inherited descriptor is closed; the
   environment is applied only by the final ``execve``, after the drop, so loader and shell
   variables (``LD_PRELOAD``, ``BASH_ENV``, …) act on the unprivileged kernel alone;
2. the capability bounding set and the ambient set are emptied, supplementary groups cleared,
   and real/effective/saved gid and uid set to the sandbox's: the kernel clears the permitted
   and effective sets on that change; the inheritable set is cleared by hand;
3. the result is checked from ``/proc/self/status`` and the launch fails closed (exit 126)
   unless the process is the sandbox uid with no capability in any set and ``no_new_privs``;
4. the working dir is entered (bwrap, root without CAP_DAC_OVERRIDE, could not: it is the
   sandbox uid's, 0700).

Standard library only, run with ``-I -S``: no site, no PYTHON* variable, no current directory on
``sys.path``, since it runs before the drop.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import NoReturn

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
EXIT_REFUSED = 126


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _fail(why: str) -> NoReturn:
    sys.stderr.write(f"kernel-bridge sandbox: {why}; refusing to start the kernel\n")
    sys.stderr.flush()
    os._exit(EXIT_REFUSED)


def _check(ok: int, what: str) -> None:
    if ok != 0:
        _fail(f"{what} failed: {os.strerror(ctypes.get_errno())}")


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no capabilities and no way to regain any."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: no effective, permitted or inheritable capability
    _check(libc.capset(ctypes.byref(header), data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def verify(uid: int, gid: int) -> None:
    """Fail closed unless the drop really happened (a kernel quirk must not run code as root)."""
    with open("/proc/self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    if status.get("Uid", "").split() != [str(uid)] * 4:
        _fail(f"uid is {status.get('Uid')!r}, expected {uid}")
    if status.get("Gid", "").split() != [str(gid)] * 4:
        _fail(f"gid is {status.get('Gid')!r}, expected {gid}")
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(status.get(key, "1"), 16) != 0:
            _fail(f"{key} is {status.get(key)}")
    if status.get("NoNewPrivs", "0").strip() != "1":
        _fail("no_new_privs is not set")
    if os.getuid() == 0 or os.geteuid() == 0:
        _fail("still root")


def read_payload(fd: int) -> tuple[int, int, str, list[str], dict[str, str]]:
    """The launch descriptor → (uid, gid, working dir, the kernel's argv, its environment).
    Also read by a zygote-forked kernel (``kernelspecs/_zygote.py``): one format for both."""
    with os.fdopen(fd, "rb") as f:
        fields = f.read().decode().split("\0")
    try:
        uid, gid, cwd, argc = int(fields[0]), int(fields[1]), fields[2], int(fields[3])
    except (IndexError, ValueError):
        _fail("malformed launch descriptor")
    command = fields[4:4 + argc]
    env = dict(pair.split("=", 1) for pair in fields[4 + argc:] if "=" in pair)
    if not command:
        _fail("no kernel command")
    return uid, gid, cwd, command, env


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not argv[1].isdigit():
        _fail("usage: _enter.py FD")
    uid, gid, cwd, command, env = read_payload(int(argv[1]))
    os.closerange(3, 1 << 16)  # nothing of the server's reaches the kernel
    drop_privileges(uid, gid)
    verify(uid, gid)
    try:
        os.chdir(cwd)
    except OSError as exc:
        _fail(f"cannot enter {cwd!r}: {exc}")
    try:
        os.execvpe(command[0], command, env)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in a client's variable
        _fail(f"cannot run {command[0]!r}: {exc}")


if __name__ == "__main__":
    main(sys.argv)
