"""A throw-away PostgreSQL cluster for tests: ``initdb`` in a temp dir, run as an unprivileged
user (postgres refuses root: ``nobody`` when we are root), listening on a unix socket in that
dir and on a free port of 127.0.0.1, stopped and removed at the end.

Debian's ``postgresql`` package (``make postgres``) provides the binaries. The fixtures in
``tests/conftest.py`` start one cluster per test run, lazily, and give each test a fresh
database of its own::

    def test_x(pg_url: str) -> None:       # postgresql://kb@127.0.0.1:PORT/t_…
        with run_server(database_url=pg_url) as server: ...

``KB_TEST_DATABASE=postgres pytest tests/test_backendai.py`` runs any server test with every
server on a fresh PostgreSQL database (tests/support.py asks :func:`database_for`; a server
restarted on the same data dir gets the same database). Tests that open the SQLite file
themselves, run the CLI without the server's environment, or expect the data dir's flock do not
apply there (three in tests/test_lifecycle.py and tests/test_backendai_limits.py).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from .support import free_port

SUPERUSER = "kb"
UNPRIVILEGED = "nobody"


def pg_bin() -> Path:
    """The newest installed server's bin dir (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL is not installed: run `make postgres` (Debian's postgresql)")


@dataclass
class Cluster:
    root: Path
    port: int
    bin: Path
    _run_as: dict[str, Any]
    fsync: bool = False

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pg_ctl(self, *args: str) -> None:
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args],
                       check=True, capture_output=True, cwd=self.root, **self._run_as)

    def stop(self) -> None:
        self.pg_ctl("stop", "-m", "fast", "-w")

    def start(self) -> None:
        options = f"-k {self.root} -h 127.0.0.1 -p {self.port} -c max_connections=300"
        if not self.fsync:  # a throw-away cluster on a shared 2-core machine
            options += " -c fsync=off -c full_page_writes=off"
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.root / "server.log"), "-o", options)


@contextmanager
def postgres_cluster(fsync: bool = False) -> Iterator[Cluster]:
    """``fsync=True``: durable commits, as a real deployment (bench/store.py measures both)."""
    bindir = pg_bin()
    run_as: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="kb-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [],
                  "env": {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}}
    cluster = Cluster(root, free_port(), bindir, run_as, fsync)
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER,
                        "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, cwd=root, **run_as)
        cluster.start()
        yield cluster
    finally:
        if (root / "data" / "postmaster.pid").exists():
            try:
                cluster.stop()
            except subprocess.CalledProcessError:
                cluster.pg_ctl("stop", "-m", "immediate", "-w")
        shutil.rmtree(root, ignore_errors=True)


_shared: Cluster | None = None
_shared_cm: contextlib.ExitStack | None = None


def shared_cluster() -> Cluster:
    """The run's one cluster, started on first use and removed when the interpreter exits."""
    global _shared, _shared_cm
    if _shared is None:
        stack = contextlib.ExitStack()
        _shared = stack.enter_context(postgres_cluster())
        _shared_cm = stack
        atexit.register(stack.close)
    return _shared


_by_data_dir: dict[Path, str] = {}


def database_for(data_dir: Path) -> str:
    """A database on the shared cluster for this data dir: a new one the first time, the same
    one for a server restarted on the same dir (dropped with the cluster)."""
    key = Path(os.path.realpath(data_dir))
    if key not in _by_data_dir:
        _by_data_dir[key] = shared_cluster().create_database()
    return _by_data_dir[key]
