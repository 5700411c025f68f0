"""The seccomp filter every sandboxed kernel runs under, built with libseccomp.

Modelled on Docker's default profile for a container without capabilities: what a process
could use to leave or widen its sandbox, or to reach the host kernel's rarely hardened corners,
fails with EPERM; everything else is allowed.

* new namespaces (``unshare``, ``setns``, ``clone`` with a namespace flag; ``clone3`` passes its
  flags in memory, which a filter cannot read, so it returns ENOSYS and the libc falls back to
  ``clone``, as Docker does): a user namespace would give back every capability, and with them
  the cgroup files that hold the memory and process caps (security review F2);
* mounts, old and new API; kernel keyrings (shared by every process of a uid: F3); ``bpf``,
  ``perf_event_open``, ``io_uring``; ``kexec``, modules, swap, reboot, clocks, host names;
  ``ptrace`` and its relatives (reading another process's memory, even one of the same
  sandbox, is not something user code needs, and it was the classic way around a filter);
  ``userfaultfd`` (stalls the kernel at will), file handles (``open_by_handle_at``);
* syscalls newer than this libseccomp knows (so newer than this list was written against)
  return ENOSYS, as runc does: a kernel upgrade adds no unreviewed entry point;
* other architectures' syscall ABIs (i386, x32) kill the process: the filter only speaks the
  native one, so a syscall number cannot be smuggled through another ABI's table.

The binding is ``pyseccomp``: ctypes over the system's libseccomp2, API-compatible with
libseccomp's own Python bindings, which Debian ships (``python3-seccomp``) only compiled for its
own ``/usr/bin/python3``; the server runs in any CPython venv. The official module is used
instead when it is importable. The filter is compiled once to BPF by libseccomp (nothing here
assembles BPF) and handed to bubblewrap (``--seccomp FD``), which installs it just before it
starts the sandbox's first process.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from typing import Any

# Denied with EPERM. Names this libseccomp does not know are covered by the ENOSYS range.
DENIED = (
    # namespaces and mounts
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "open_tree", "open_tree_attr", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr",
    # kernel keyrings
    "keyctl", "add_key", "request_key",
    # kernel attack surface and tracing
    "bpf", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd", "lookup_dcookie", "fanotify_init", "open_by_handle_at", "name_to_handle_at",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    "kcmp", "modify_ldt", "iopl", "ioperm", "syslog", "vhangup", "uselib", "ustat", "sysfs",
    "_sysctl", "move_pages", "migrate_pages", "nfsservctl", "acct", "quotactl", "quotactl_fd",
    # the machine itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "reboot", "swapon", "swapoff",
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "sethostname",
    "setdomainname",
)
# clone(2)'s flags that make a namespace; CLONE_NEWTIME (0x80) exists only for clone3/unshare.
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
# How far past the newest known syscall number the ENOSYS range reaches (x86_64 adds ~10 a year).
FUTURE_SYSCALLS = 128


class SeccompUnavailable(RuntimeError):
    def __init__(self, why: str) -> None:
        super().__init__(
            f"Cannot build the sandbox's seccomp filter ({why}). Install libseccomp2 "
            "(`apt-get install libseccomp2`) and the `pyseccomp` package, or start with "
            "KB_SANDBOX=off to run kernels unconfined (unsafe).")


def _binding() -> Any:
    try:
        import seccomp  # libseccomp's own bindings, where they match this interpreter

        return seccomp
    except ImportError:
        pass
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # OSError: the module loads libseccomp on import
        raise SeccompUnavailable(str(exc)) from exc
    return pyseccomp


def build() -> bytes:
    """The filter as a BPF program for ``bwrap --seccomp``. Raises SeccompUnavailable."""
    sc = _binding()
    try:
        native = sc.system_arch()
        f = sc.SyscallFilter(sc.ALLOW)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            # A binary tree: ~10 comparisons per syscall instead of a chain of ~200.
            f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
        known = [n for n in DENIED if _number(sc, native, n) is not None]
        for name in known:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        for flag in NAMESPACE_FLAGS.values():
            f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        newest = _newest(sc, native)
        for nr in range(newest + 1, newest + 1 + FUTURE_SYSCALLS):
            f.add_rule(sc.ERRNO(errno.ENOSYS), nr)
        out = io.BytesIO()
        _export(f, out)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SeccompUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return out.getvalue()


def _number(sc: Any, arch: int, name: str) -> int | None:
    try:
        nr = int(sc.resolve_syscall(arch, name))
    except (OSError, ValueError, RuntimeError):
        return None
    return nr if nr >= 0 else None  # negative: a pseudo-number, not on this architecture


def _newest(sc: Any, arch: int) -> int:
    newest = 0
    for nr in range(1024):
        try:
            if sc.resolve_syscall(arch, nr):
                newest = nr
        except (OSError, ValueError, RuntimeError):
            continue
    return newest


def _export(f: Any, out: io.BytesIO) -> None:
    # Both bindings write to a real file descriptor: go through a memfd.
    fd = os.memfd_create("kb-seccomp", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as file:
            f.export_bpf(file)
            file.flush()
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 65536):
            out.write(chunk)
    finally:
        os.close(fd)
