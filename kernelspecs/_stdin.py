"""Detect that a process tree is blocked reading its stdin pipe.

A program that waits for input gives no signal on its stdout: a C ``scanf``
after an unflushed prompt, a ``read x`` in bash or a Python ``input()`` in a
grandchild all just sit there.  The kernel therefore looks at what each thread
is doing in the kernel: ``/proc/<pid>/task/<tid>/syscall`` shows the syscall
number and its arguments while a thread is blocked in it.  A thread blocked in
a read-like call on a file descriptor that resolves to *our* stdin pipe is
waiting for us (reference/feasibility.md §6).

Event-loop programs (Node.js) never block in ``read``; they sit in
``epoll_wait`` with stdin registered in the epoll set.  That shows up in
``/proc/<pid>/fdinfo/<epfd>`` as a ``tfd: <fd>`` line, so we look there too.

Limits: ``poll``/``select`` fd sets live in user memory and cannot be decoded;
an epoll waiter with stdin registered may really be waiting on a timer.
Reading another process's syscall file needs ptrace-attach rights over it,
which we have for our own children.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from typing import Final

import psutil

# Syscall numbers differ per architecture; only these two are in use.
_READ_LIKE_BY_ARCH: Final[dict[str, frozenset[int]]] = {
    # read, pread64, readv, preadv, preadv2
    "x86_64": frozenset({0, 17, 19, 295, 327}),
    "aarch64": frozenset({63, 67, 65, 69, 286}),
}
_EPOLL_WAIT_BY_ARCH: Final[dict[str, frozenset[int]]] = {
    # epoll_wait, epoll_pwait, epoll_pwait2
    "x86_64": frozenset({232, 281, 441}),
    "aarch64": frozenset({22, 441}),
}
_ARCH: Final[str] = platform.machine()
READ_LIKE: Final[frozenset[int]] = _READ_LIKE_BY_ARCH.get(_ARCH, frozenset())
EPOLL_WAIT: Final[frozenset[int]] = _EPOLL_WAIT_BY_ARCH.get(_ARCH, frozenset())


def pipe_identity(fd: int) -> str:
    """The ``/proc/*/fd`` link text of a pipe end, e.g. ``pipe:[12345]``.

    Both ends of a pipe share the inode, so the parent's write end names the
    child's read end too.
    """
    return f"pipe:[{os.fstat(fd).st_ino}]"


def _fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _epoll_watches(pid: int, epfd: int, target: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}") as fdinfo:
            lines = fdinfo.readlines()
    except OSError:
        return False
    for line in lines:
        # Format: "tfd:        0 events:       19 data: ..."
        fields = line.split()
        if (
            len(fields) >= 2
            and fields[0] == "tfd:"
            and fields[1].isdigit()
            and _fd_target(pid, int(fields[1])) == target
        ):
            return True
    return False


def thread_waits_on(pid: int, tid: int, target: str) -> bool:
    """Whether thread ``tid`` of ``pid`` is blocked reading the pipe ``target``."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        # The thread is gone, or we may not ptrace it: not ours to answer.
        return False
    # "running" = on a CPU, "-1 ..." = blocked outside a syscall (e.g. a page fault).
    if len(fields) < 2 or not fields[0].isdigit():
        return False
    nr, arg1 = int(fields[0]), int(fields[1], 16)
    if nr in READ_LIKE:
        return _fd_target(pid, arg1) == target
    if nr in EPOLL_WAIT:
        return _epoll_watches(pid, arg1, target)
    return False


def _tree(root_pid: int) -> Iterable[int]:
    try:
        root = psutil.Process(root_pid)
        children = root.children(recursive=True)
    except psutil.Error:
        return []
    return [root_pid, *(child.pid for child in children)]


def waiting_threads(root_pid: int, target: str) -> list[tuple[int, int]]:
    """(pid, tid) of every thread in the tree of ``root_pid`` blocked reading ``target``.

    All threads are scanned because runtimes read stdin off the main thread
    (a Python reader thread, Deno's worker) while the main thread sits in futex.
    """
    found: list[tuple[int, int]] = []
    for pid in _tree(root_pid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        found.extend((pid, int(tid)) for tid in tids if thread_waits_on(pid, int(tid), target))
    return found


def blocked_on_stdin(root_pid: int, target: str) -> bool:
    """Whether any process under ``root_pid`` is blocked reading the pipe ``target``."""
    return bool(waiting_threads(root_pid, target))
