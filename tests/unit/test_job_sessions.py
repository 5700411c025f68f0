"""JobSessions over a real SQLite store and a scripted, slow kernel start (no server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.job_sessions import JobSessions
from bridge.keypairs import Keypairs
from bridge.settings import Settings
from bridge.store import SqliteStore

from ..waiting import until

KERNEL_START_S = 0.6


class SlowKernels:
    """Stands in for Sessions: a kernel that takes KERNEL_START_S to start."""

    def __init__(self) -> None:
        self.ready_at: float | None = None
        self.destroyed: list[str] = []

    async def create(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(KERNEL_START_S)
        self.ready_at = time.time()
        return object()

    async def discard(self, kernel: Any, reason: str, *, now: bool = False) -> None:
        self.destroyed.append(reason)

    def find(self, access_key: str, ident: str) -> Any:
        return None  # nothing re-adopted

    def all(self) -> list[Any]:
        return []


class SlowStore(SqliteStore):
    """Writes as a loaded machine's store does them: each takes a while."""

    delay = 0.3

    async def execute(self, sql: str, params: Any = ()) -> int:
        await asyncio.sleep(self.delay)
        return await super().execute(sql, params)

    async def transaction(self, statements: Any) -> None:
        await asyncio.sleep(self.delay)
        await super().transaction(statements)


@pytest.mark.parametrize("store_cls", [SqliteStore, SlowStore], ids=["store", "slow-store"])
def test_open_ttl_counts_from_kernel_ready(tmp_path: Path,
                                           store_cls: type[SqliteStore]) -> None:
    """A dedicated session's open TTL starts once its kernel is up: a slow start on a loaded
    machine must not eat the client's time to submit its first job."""

    async def scenario() -> None:
        store = store_cls(tmp_path / "db.sqlite3")
        await store.open()
        kernels = SlowKernels()
        jobs = JobSessions(Settings(data_dir=tmp_path), store, Keypairs(store, 1),
                           kernels, open_ttl=0.4)  # type: ignore[arg-type]
        await jobs.start()
        try:
            js = await jobs.create("ak", "dedicated", "python", max_ttl=60)
            assert kernels.ready_at is not None and js.open_deadline is not None
            assert js.open_deadline >= kernels.ready_at + 0.4
            assert js.state.value == "open"  # the kernel took longer than the whole TTL
            # The reaper still fires it: closed, stamped with the deadline itself.
            await until(lambda: js.state.value == "closed", 30, "the open TTL's close")
            # The state turns closed first; its record is written, then the kernel goes: on a
            # loaded machine the store's write takes a while, so wait for the kernel's end too.
            await until(lambda: kernels.destroyed, 30, "the kernel's discard after the close")
            assert [state for state, _ in js.timestamps] == ["open", "closed"]
            closed_at = js.timestamps[-1][1]
            assert kernels.ready_at + 0.4 <= closed_at < kernels.ready_at + 0.4 + 1.0
            assert kernels.destroyed == ["job session closed"]
        finally:
            await jobs.stop()
            await store.close()

    asyncio.run(scenario())
