from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import Client, Server, run_server


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """One real server for the tests that do not need special settings."""
    with run_server() as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c
