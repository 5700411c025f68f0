"""What a sandbox shows of the host: read-only trees, masks over what it must not see, and the
mount points bubblewrap makes. Pure computations over paths and argv, used by
:mod:`bridge.sandbox`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEM_TREES = ("/usr", "/etc")


@dataclass(frozen=True)
class Bind:
    src: str
    dest: str


def under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def masks(hidden: Iterable[str], binds: Iterable[Bind]) -> list[str]:
    """Sandbox paths to cover with an empty tmpfs: hidden host paths that a bind exposes."""
    out = []
    binds = list(binds)
    for h in hidden:
        if not os.path.exists(h) or any(under(os.path.realpath(b.src), h) for b in binds):
            continue  # a mask would cover something the kernel needs (a venv in the tree)
        for b in binds:
            real = os.path.realpath(b.src)
            if under(h, real) and h != real:
                out.append(b.dest.rstrip("/") + h[len(real):])
    return sorted(set(out), key=len)


def unreadable_entries(root: str) -> tuple[list[str], list[str]]:
    """(dirs, files) under ``root`` that an unprivileged host user could not read.

    Kernels run as the unprivileged sandbox uid, which the "others" bits already keep out; the
    masks stay as a second wall (they held alone when kernels ran as uid 0), so /etc/shadow, ssh
    host keys and TLS private keys are not even there to try. By rule, not by a list of names.
    """
    dirs: list[str] = []
    files: list[str] = []
    for top, subdirs, names in os.walk(root):
        keep = []
        for d in subdirs:
            path = os.path.join(top, d)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if st.st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
                    dirs.append(path)
                else:
                    keep.append(d)
        subdirs[:] = keep
        for n in names:
            path = os.path.join(top, n)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IROTH:
                    files.append(path)
    return sorted(dirs), sorted(files)


def toolchain_binds() -> tuple[list[Bind], list[str]]:
    """Read-only binds and PATH dirs for the language table's tools that live outside /usr.

    A tool found on the server's PATH under /usr needs nothing. A rustup proxy (rustc, cargo
    under ~/.cargo/bin) is replaced by its toolchain's sysroot, whose bin/ goes on PATH: that
    exposes neither rustup's home nor ~/.cargo (registry credentials). Any other tool brings its
    install prefix (the parent of its bin/). Python is the kernel's own interpreter (bound by
    :func:`interpreter_paths`).
    """
    from .languages import LANGUAGES

    binds: dict[str, Bind] = {}
    path: list[str] = []
    tools = dict.fromkeys(t for lang in LANGUAGES for t in lang.toolchain)
    for tool in tools:
        if tool.startswith("python"):
            continue
        found = shutil.which(tool)
        if found is None:
            continue
        real = os.path.realpath(found)
        if any(under(found, t) and under(real, t) for t in SYSTEM_TREES):
            continue
        if os.path.basename(real) == "rustup":
            try:
                sysroot = subprocess.run([found, "--print", "sysroot"], capture_output=True,
                                         text=True, timeout=30, check=True).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                log.warning("cannot locate the Rust toolchain behind %s", found)
                continue
            prefix, bindir = sysroot, os.path.join(sysroot, "bin")
        else:
            bindir = os.path.dirname(real)
            prefix = os.path.dirname(bindir)
        if any(under(prefix, t) for t in SYSTEM_TREES):
            continue
        binds.setdefault(prefix, Bind(prefix, prefix))
        path.append(bindir)
    return list(binds.values()), list(dict.fromkeys(path))


def interpreter_paths() -> list[str]:
    """Host dirs the kernel's interpreter loads from (read-only)."""
    paths: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        real = os.path.realpath(p)
        if not any(under(real, t) for t in SYSTEM_TREES):
            paths.add(real)
            if p != real:
                paths.add(p)
    return sorted(paths, key=len)


def python_env_paths(prefix: Path) -> list[str]:
    """Host dirs a venv or conda env at ``prefix`` loads from: the env (by the path kernels
    are started with, and its real path should that differ) and, for a venv, the installation
    it was made from (pyvenv.cfg's ``home``) when that is not under /usr."""
    paths = [str(prefix), os.path.realpath(prefix)]
    cfg = prefix / "pyvenv.cfg"
    with contextlib.suppress(OSError):
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                paths.append(os.path.realpath(os.path.dirname(value.strip())))
    out = [p for p in paths if not any(under(p, t) for t in SYSTEM_TREES)]
    return sorted(dict.fromkeys(out), key=len)


def kernel_modules_dir() -> Path:
    import kernelspecs  # our kernel modules may live in a source checkout (editable install)

    return Path(next(iter(kernelspecs.__path__))).resolve()


_TWO_ARGS = {"--bind", "--ro-bind", "--symlink", "--ro-bind-data"}
_ONE_ARG = {"--tmpfs", "--proc", "--dev", "--dir"}


def _bound(path: str, binds: set[str]) -> bool:
    """Whether ``path`` is one of ``binds`` (normalized) or lies under one."""
    while True:
        if path in binds:
            return True
        if path == "/":
            return False
        path = os.path.dirname(path)


def open_parents(argv: list[str]) -> list[str]:
    """``--chmod 0755`` for the directories bwrap made to hold mount points (it makes them
    0700, which would keep the sandbox uid from reaching /home/work or the interpreter).
    Only bwrap's own dirs: nothing inside a host tree bound in, no mount point (/tmp keeps 1777).
    """
    dests: list[str] = []
    binds: list[str] = []
    i = 0
    while i < len(argv):
        op = argv[i]
        if op in _TWO_ARGS:
            dests.append(argv[i + 2])
            if op in ("--bind", "--ro-bind"):
                binds.append(argv[i + 2])
            i += 3
        elif op in _ONE_ARG:
            dests.append(argv[i + 1])
            i += 2
        else:
            i += 1
    # Strings, not Paths, and a bind found by walking up a parent's own ancestors: this runs
    # for every sandbox started.
    bound = {os.path.normpath(b) for b in binds}
    taken = set(dests)
    parents: set[str] = set()
    for dest in dests:
        p = os.path.dirname(os.path.normpath(dest))
        while p != "/" and p not in parents:
            if p not in taken and not _bound(p, bound):
                parents.add(p)
            p = os.path.dirname(p)
    out: list[str] = []
    for p in sorted(parents, key=lambda p: (p.count("/"), p)):
        out += ["--chmod", "0755", p]
    return out
