"""Per-kernel cgroups: the memory and process caps, and the CPU/memory the kernel really used.

Detected once per server (:meth:`Cgroups.detect`), in this order:

* **v2** — a cgroup2 hierarchy whose own cgroup offers ``memory`` and ``pids`` and lets us
  enable them for a child: kernels live in ``<own>/kernel-bridge/<kernel id>`` with
  ``memory.max``, ``memory.swap.max=0`` and ``pids.max``.
* **v1** — writable ``memory`` and ``pids`` hierarchies (plus ``cpuacct`` for CPU time and
  ``cpu`` so all kernels together weigh as one task against the server): the same path in each.
* **none** — nothing writable: the sandbox falls back to RLIMIT_AS for memory and the process
  tree's CPU time; there is then no process cap for a root server (RLIMIT_NPROC does not bind
  uid 0, feasibility.md §5).

A kernel's cgroup is created before its launch, joined between fork and exec (so bwrap and
everything it starts inherit it), kept across restarts (CPU time accumulates, as seed 001's CPU
credit does) and removed, after killing whatever is left in it, when the kernel is shut down.
Reads and writes here are cgroupfs files: in-kernel and microseconds long, fine on the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

PARENT = "kernel-bridge"
Version = Literal["v2", "v1", "none"]
V1_REQUIRED = ("memory", "pids")
V1_OPTIONAL = ("cpuacct", "cpu")


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str | int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` → {controller: path}; the v2 entry is keyed ``""``."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            paths[ctrl] = parts[2]
    return paths


def _mounts(mountinfo: str) -> dict[str, tuple[Path, str]]:
    """``/proc/self/mountinfo`` → {controller: (mount point, mount root)}; cgroup2 is ``""``."""
    found: dict[str, tuple[Path, str]] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        fstype, opts = after[0], after[2].split(",")
        point = Path(fields[4].replace("\\040", " "))
        if fstype == "cgroup2":
            found.setdefault("", (point, fields[3]))
        elif fstype == "cgroup":
            for opt in opts:
                if opt in V1_REQUIRED + V1_OPTIONAL:
                    found.setdefault(opt, (point, fields[3]))
    return found


def _dir(mount: tuple[Path, str], own: str) -> Path:
    point, root = mount
    rel = os.path.relpath(own, root) if own.startswith(root) else own.lstrip("/")
    return point if rel in (".", "") else point / rel


@dataclass
class KernelCgroup:
    """One kernel's cgroup: a directory per hierarchy (one in v2)."""

    version: Version
    dirs: dict[str, Path]  # controller (v2: "") → directory

    def __post_init__(self) -> None:
        # Computed now: the preexec hook must only open and write between fork and exec.
        self._procs = [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def _file(self, ctrl: str, name: str) -> Path:
        return self.dirs["" if self.version == "v2" else ctrl] / name

    def join(self) -> None:
        """Move the calling process in (the provisioner's preexec: child, before exec)."""
        pid = str(os.getpid())
        for procs in self._procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid.encode())
            finally:
                os.close(fd)

    def ensure(self, mem_bytes: int, pids: int) -> None:
        """Re-create the directories if something removed them (a sweep). Raises OSError."""
        if all(d.is_dir() for d in self.dirs.values()):
            return
        for d in dict.fromkeys(self.dirs.values()):
            d.mkdir(exist_ok=True)
        self.set_limits(mem_bytes, pids)

    def set_limits(self, mem_bytes: int, pids: int) -> None:
        """0 means no cap. Raises OSError if the controller refuses."""
        if self.version == "v2":
            _write(self._file("", "memory.max"), mem_bytes or "max")
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                _write(self._file("", "memory.swap.max"), 0 if mem_bytes else "max")
            _write(self._file("", "pids.max"), pids or "max")
            return
        _write(self._file("memory", "memory.limit_in_bytes"), mem_bytes or -1)
        with contextlib.suppress(OSError):  # memsw exists only with swap accounting
            _write(self._file("memory", "memory.memsw.limit_in_bytes"), mem_bytes or -1)
        with contextlib.suppress(OSError):
            _write(self._file("memory", "memory.swappiness"), 0)
        _write(self._file("pids", "pids.max"), pids or "max")

    def cpu_seconds(self) -> float | None:
        """CPU time of everything that ever ran in the cgroup (across restarts)."""
        try:
            if self.version == "v2":
                for line in _read(self._file("", "cpu.stat")).splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        return int(value) / 1e6
                return None
            if "cpuacct" not in self.dirs:
                return None
            return int(_read(self._file("cpuacct", "cpuacct.usage"))) / 1e9
        except (OSError, ValueError):
            return None

    def memory(self) -> tuple[int, int] | None:
        """(current, peak) bytes; current leaves out reclaimable file cache."""
        try:
            if self.version == "v2":
                cur = int(_read(self._file("", "memory.current")))
                stat = self._stat(self._file("", "memory.stat"))
                cur -= stat.get("inactive_file", 0)
                peak_file = self._file("", "memory.peak")
                peak = int(_read(peak_file)) if peak_file.exists() else cur
                return max(cur, 0), peak
            cur = int(_read(self._file("memory", "memory.usage_in_bytes")))
            cur -= self._stat(self._file("memory", "memory.stat")).get("total_inactive_file", 0)
            peak = int(_read(self._file("memory", "memory.max_usage_in_bytes")))
            return max(cur, 0), peak
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the memory cap has killed so far."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            return self._stat(self._file("memory", name)).get("oom_kill", 0)
        return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self._procs:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in Path(procs).read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL everything still inside (leftovers of a dead or restarted kernel)."""
        kill_file = self.dirs.get("", Path()) / "cgroup.kill"
        if self.version == "v2" and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, 1)
                return
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Kill what is left and remove the directories; True once all are gone."""
        self.kill()
        gone = True
        for d in dict.fromkeys(self.dirs.values()):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # EBUSY: a killed process has not been reaped yet
                gone = False
        return gone

    @staticmethod
    def _stat(path: Path) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out


class Cgroups:
    """Where kernel cgroups go on this machine, or that there is nowhere."""

    def __init__(self, version: Version, parents: dict[str, Path]) -> None:
        self.version = version
        self.parents = parents  # controller (v2: "") → the kernel-bridge parent directory

    @classmethod
    def detect(cls, proc: Path = Path("/proc/self")) -> Cgroups:
        try:
            own = _own_paths((proc / "cgroup").read_text())
            mounts = _mounts((proc / "mountinfo").read_text())
        except OSError:
            return cls("none", {})
        for attempt in (cls._try_v2, cls._try_v1):
            found = attempt(own, mounts)
            if found is not None:
                return found
        return cls("none", {})

    @classmethod
    def _try_v2(cls, own: dict[str, str], mounts: dict[str, tuple[Path, str]]) -> Cgroups | None:
        if "" not in mounts or "" not in own:
            return None
        base = _dir(mounts[""], own[""])
        try:
            offered = _read(base / "cgroup.controllers").split()
            if not all(c in offered for c in V1_REQUIRED):
                return None
            wanted = [c for c in ("memory", "pids", "cpu") if c in offered]
            # Enabling controllers for children fails (EBUSY) while the server's own cgroup
            # holds processes, unless it is the root; then v2 is not ours to use.
            enabled = _read(base / "cgroup.subtree_control").split()
            missing = [c for c in wanted if c not in enabled]
            if missing:
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
            parent = base / PARENT
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        except OSError:
            return None
        return cls("v2", {"": parent})

    @classmethod
    def _try_v1(cls, own: dict[str, str], mounts: dict[str, tuple[Path, str]]) -> Cgroups | None:
        parents: dict[str, Path] = {}
        for ctrl in V1_REQUIRED + V1_OPTIONAL:
            if ctrl not in mounts or ctrl not in own:
                if ctrl in V1_REQUIRED:
                    return None
                continue
            parent = _dir(mounts[ctrl], own[ctrl]) / PARENT
            try:
                parent.mkdir(exist_ok=True)
                if not os.access(parent / "cgroup.procs", os.W_OK):
                    raise PermissionError(parent)
            except OSError:
                if ctrl in V1_REQUIRED:
                    return None
                continue
            if ctrl == "memory":
                with contextlib.suppress(OSError):  # children count against this parent
                    _write(parent / "memory.use_hierarchy", 1)
            parents[ctrl] = parent
        return cls("v1", parents)

    @property
    def enabled(self) -> bool:
        return self.version != "none"

    def describe(self) -> str:
        if not self.enabled:
            return "no writable cgroup (memory: RLIMIT_AS; no process cap)"
        where = ", ".join(str(p) for p in dict.fromkeys(self.parents.values()))
        return f"cgroup {self.version} under {where}"

    def create(self, name: str, mem_bytes: int, pids: int) -> KernelCgroup:
        """A new cgroup for one kernel with its caps set. Raises OSError."""
        dirs = {ctrl: parent / name for ctrl, parent in self.parents.items()}
        cg = KernelCgroup(self.version, dirs)
        try:
            for d in dict.fromkeys(dirs.values()):
                d.mkdir(exist_ok=True)
            cg.set_limits(mem_bytes, pids)
        except OSError:
            cg.remove()
            raise
        return cg

    def sweep(self, in_use: Callable[[str], bool] = lambda name: False,
              min_age: float = 60.0) -> int:
        """Remove kernel cgroups left empty (by a server that died, or a dead kernel's) for
        ``min_age`` seconds; returns how many. A live kernel's cgroup is never empty but while
        it restarts, and the provisioner re-creates one that went (:meth:`KernelCgroup.ensure`).
        """
        removed = 0
        now = time.time()
        for parent in dict.fromkeys(self.parents.values()):
            with contextlib.suppress(OSError):
                for d in parent.iterdir():
                    with contextlib.suppress(OSError):
                        if (d.is_dir() and not in_use(d.name)
                                and now - d.stat().st_mtime > min_age
                                and not _read(d / "cgroup.procs")):
                            d.rmdir()
                            removed += 1
        return removed
