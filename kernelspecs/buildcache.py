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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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
