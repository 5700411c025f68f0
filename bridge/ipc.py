"""The IPC root: the private parent of every kernel's socket dir and of the keepers' sockets, and
whose dirs in it are whose.

Each kernel's dir holds ``owner`` (the pid and start time of the server that runs the kernel;
a later server that adopts it claims it), ``scope`` (that server's data dir: a server judges
only its own data dir's dirs) and ``held`` (its keeper and pids): what a sweep needs to tell a
live server's kernel from one a gone server left, and to stop the latter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .cgroups import Cgroups, KernelCgroup
from .disk import mounted, unmount_ipc
from .keeper import kill_held, start_time
from .sandbox import SandboxUnavailable

# sun_path is 108 bytes; a short private root keeps every socket path well under it.
IPC_ROOT = Path(tempfile.gettempdir()) / f"kb-ipc-{os.getuid()}"


def ipc_root(root: Path = IPC_ROOT) -> Path:
    """The private parent of every kernel's sockets and connection file (which holds the key
    that signs its messages), created 0700. Refused, never repaired, when it is a link, someone
    else's, or open to group or others: whoever made it first would hold every kernel.

    Raises SandboxUnavailable.
    """
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    problem = ipc_root_problem(root)
    if problem:
        raise SandboxUnavailable(
            f"The kernels' IPC root {root} {problem}. Someone else may be able to read kernel "
            f"keys there: remove it (`rm -rf {root}`) and start again.")
    return root


def ipc_root_problem(root: Path = IPC_ROOT) -> str:
    """What is wrong with an existing IPC root ("" when it is ours and private)."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o077:
        return f"has mode {stat.filemode(st.st_mode)}, not drwx------"
    return ""


OWNER = "owner"  # "<pid> <start time>" of the server that runs the kernel of an IPC dir
SCOPE = "scope"  # which data dir that server serves (a digest: the dir is bound in the sandbox)
HELD = "held"  # its keeper and pids, for a sweep to stop a kernel nobody adopted
FRESH_S = 60.0  # an unclaimed dir this young is a kernel starting right now


# The data dir of this process's server. The IPC root is shared by every server of the uid on
# the host: a server judges only its own data dir's dirs, so a kernel another data dir's server
# left running (killed, or stopped with --keep-kernels) waits for that data dir's next server,
# which adopts it, instead of being swept by whichever server starts first.
_scope = ""


def scope_of(data_dir: Path) -> str:
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:32]


def set_owner_scope(data_dir: Path) -> None:
    """Name the data dir this process's kernels belong to (once, before any kernel starts)."""
    global _scope
    _scope = scope_of(data_dir)


def claim(ipc_dir: Path) -> None:
    (ipc_dir / SCOPE).write_text(_scope)
    (ipc_dir / OWNER).write_text(f"{os.getpid()} {start_time(os.getpid())}")


def _owner_alive(ipc_dir: Path, mounts: Mapping[str, tuple[str, str]], scope: str) -> bool:
    """Whether a live server runs the kernel of ``ipc_dir``. A dir without an owner file is an
    older server's: its tmpfs source names that server's pid; unmounted, it is left alone
    unless no socket is in it."""
    try:
        pid, start = (ipc_dir / OWNER).read_text().split()
        with contextlib.suppress(FileNotFoundError):  # (none: a server before scopes)
            if (ipc_dir / SCOPE).read_text() != scope:
                return True  # another data dir's: not ours to judge
        return str(start_time(int(pid))) == start
    except FileNotFoundError:
        if time.time() - ipc_dir.stat().st_mtime < FRESH_S:  # being made: claimed next
            return True
        source = mounts.get(os.path.realpath(ipc_dir), ("", ""))[1]
        old = source.rsplit("-", 1)[-1]
        if old.isdigit():
            return start_time(int(old)) is not None
        return any(p.is_socket() for p in (ipc_dir / "s").glob("*"))
    except (OSError, ValueError):
        return False


def remove_ipc(ipc_dir: Path) -> None:
    unmount_ipc(ipc_dir)
    shutil.rmtree(ipc_dir, ignore_errors=True)


def sweep_ipc(keep: set[Path], root: Path = IPC_ROOT, cgroups: Cgroups | None = None, *,
              scope: str | None = None) -> int:
    """What servers that are gone left in the IPC root and no kept kernel uses: kernel dirs not
    in ``keep`` whose server is gone (their kernels, still held by a keeper, are killed through
    their cgroup first; the keeper reaps them and exits with its last one), and the sockets of
    keepers that exited. Returns how many kernel dirs went. Run it once the kernels to keep were
    adopted. ``scope``: whose dirs it judges (default: this process's data dir's)."""
    kept = {Path(os.path.realpath(p)) for p in keep}
    mine = _scope if scope is None else scope
    mounts = mounted()
    removed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                if Path(os.path.realpath(entry)) in kept or _owner_alive(entry, mounts, mine):
                    continue
                if cgroups is not None and cgroups.enabled:
                    dirs = {c: p / entry.name for c, p in cgroups.parents.items()}
                    if any(d.is_dir() for d in dirs.values()):
                        KernelCgroup(cgroups.version, dirs).kill()
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    for held in json.loads((entry / HELD).read_text()):
                        kill_held(held["keeper"], [int(held["pid"])])
                remove_ipc(entry)
                removed += 1
            elif (entry.is_socket() and entry.name.startswith(("keeper-", "zygote-"))
                  and not _answers(entry)):  # its keeper exited without removing it (killed)
                entry.unlink()
    return removed


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
