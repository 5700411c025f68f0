from __future__ import annotations

from collections.abc import Iterator

import pytest

from .pg import Cluster, shared_cluster
from .support import USED_DATA_DIRS, Client, Server, run_server, unmount_leftovers


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_mounts() -> Iterator[None]:
    """Filesystems of servers killed on purpose, in data dirs the tests kept: unmounted at the
    end, so the shared machine keeps no loop device of ours."""
    yield
    for data_dir in USED_DATA_DIRS:
        unmount_leftovers(data_dir)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """One real server for the tests that do not need special settings."""
    with run_server() as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throw-away PostgreSQL cluster for the whole run, started by the first test that asks
    (tests/pg.py); stopped and removed when the run ends."""
    yield shared_cluster()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database of this test's own, dropped afterwards."""
    url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(url)
