"""A content-hash cache of builds, kept in the session's working dir.

A compiled language's query (or a judge run) whose source, compile command
and toolchain are the same as an earlier one's runs the earlier build again
instead of compiling it anew.  The key is a SHA-256 of everything the build
depends on; an entry is a directory holding the build's products, published
by an atomic ``rename`` only once the compiler succeeded, so a half-written
entry is never found (two builders racing for one key: the first rename wins,
the other's copy is dropped).  The least recently used entries beyond
``KEEP`` are removed.

The cache lives under the working dir (``.kb-build``), so it goes with the
session: a restart of the kernel keeps it, a new session starts empty.  It is
the user's own dir: a user can only tamper with builds of their own code.

Batch builds (the ``"*"`` defaults) build in the working dir itself, so they
are cached by a stamp instead: ``python3 -m kernelspecs.buildcache --inputs
'*.c' --outputs main -- COMMAND`` runs COMMAND unless the inputs (names and
contents) and the command are those of the last successful build and its
outputs are still exactly what that build left.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

CACHE_DIR: Final = ".kb-build"
KEEP: Final = 16  # builds kept per session; a build is a few hundred KB to a few MB
_FORMAT: Final = 1  # bump when the layout of an entry changes


def build_key(language: str, compile_cmd: str, source_name: str, code: str) -> str:
    """The cache key of one build: what the compiler sees, and how it is called."""
    blob = json.dumps([_FORMAT, language, compile_cmd, source_name, code])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class BuildCache:
    """Builds by key under ``root``; every method tolerates a missing or foreign dir."""

    def __init__(self, root: Path, keep: int = KEEP) -> None:
        self.root = root
        self.keep = keep

    def lookup(self, key: str) -> Path | None:
        """The build dir of ``key`` if a complete build is cached (and mark it used)."""
        entry = self.root / key
        if entry.is_symlink() or not entry.is_dir():
            return None
        with contextlib.suppress(OSError):
            os.utime(entry)  # most recently used: the last to be evicted
        return entry

    def scratch(self) -> Path:
        """A fresh dir to build in, on the cache's filesystem (so publishing is a rename)."""
        try:
            self.root.mkdir(mode=0o700, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="tmp-", dir=self.root))
        except OSError:
            # A read-only or odd working dir: build outside the cache, uncached.
            return Path(tempfile.mkdtemp(prefix="kb-build-"))

    def publish(self, key: str, built: Path) -> Path:
        """Make ``built`` the entry of ``key``; returns the dir to run from."""
        entry = self.root / key
        if built.parent != self.root:
            return built  # built outside the cache (see scratch)
        try:
            built.rename(entry)
        except OSError:
            # Lost a race with another builder of the same key, or the entry is in the way.
            found = self.lookup(key)
            if found is None:
                return built
            shutil.rmtree(built, ignore_errors=True)
            return found
        self._evict()
        return entry

    def discard(self, built: Path) -> None:
        shutil.rmtree(built, ignore_errors=True)

    def _evict(self) -> None:
        try:
            entries = [p for p in self.root.iterdir()
                       if not p.name.startswith("tmp-") and p.is_dir() and not p.is_symlink()]
        except OSError:
            return
        entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)


def default_cache() -> BuildCache:
    """The cache of the working dir the kernel (or runner) was started in."""
    return BuildCache(Path.cwd() / CACHE_DIR)


def _files(root: Path, patterns: list[str]) -> dict[str, str]:
    """Files under ``root`` (hidden dirs skipped) whose name matches: relative path → hash."""
    found: dict[str, str] = {}
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                path = Path(here) / name
                if path.is_file() and not path.is_symlink():
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    found[str(path.relative_to(root))] = digest
    return found


def stamped_build(command: str, inputs: list[str], outputs: list[str],
                  root: Path | None = None) -> int:
    """Run ``command`` (bash) unless the last successful build of the same inputs left
    outputs that are still there, unchanged. Returns the exit code."""
    root = root or Path.cwd()
    key = hashlib.sha256(command.encode()).hexdigest()[:16]
    stamp = root / CACHE_DIR / f"batch-{key}.json"
    sources = hashlib.sha256(json.dumps(sorted(_files(root, inputs).items())).encode())
    want = sources.hexdigest()
    try:
        last = json.loads(stamp.read_text())
    except (OSError, ValueError):
        last = {}
    if last.get("inputs") == want and last.get("outputs") and \
            _files(root, outputs) == last["outputs"]:
        print("kernel-bridge: sources unchanged; the last build is reused", file=sys.stderr)
        return 0
    code = subprocess.call(["bash", "-c", command], cwd=root)
    if code == 0:
        with contextlib.suppress(OSError):
            stamp.parent.mkdir(mode=0o700, exist_ok=True)
            stamp.write_text(json.dumps({"inputs": want, "outputs": _files(root, outputs)}))
    else:
        with contextlib.suppress(OSError):
            stamp.unlink()
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m kernelspecs.buildcache")
    parser.add_argument("--inputs", nargs="+", required=True, help="source name patterns")
    parser.add_argument("--outputs", nargs="+", required=True, help="product name patterns")
    parser.add_argument("command", help="the build command (bash), after --")
    args = parser.parse_args(argv)
    sys.exit(stamped_build(args.command, args.inputs, args.outputs))


if __name__ == "__main__":
    main()
