"""The warm pool (issue 5): units with a fake launch, then the core with real kernels."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from bridge import languages
from bridge import pool as pool_module
from bridge.pool import GROWTH, KernelPool
from bridge.sandbox import Confinement, Mount
from bridge.service import Bridge
from bridge.settings import Settings

from .waiting import until

PYTHON = languages.resolve("python")


class FakeKernel:
    ids = itertools.count()

    def __init__(self, confinement: Confinement) -> None:
        self.id = f"k{next(self.ids)}"
        self.confinement = confinement
        self.alive = True
        self.stopped = False

    async def is_alive(self) -> bool:
        return self.alive

    async def shutdown(self) -> None:
        self.stopped = True


async def no_warm_up(kernel: object, code: str) -> None:
    pass


class FakeLaunch:
    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.started: list[FakeKernel] = []

    async def __call__(self, spec: str, confinement: Confinement) -> FakeKernel:
        await asyncio.sleep(self.seconds)
        kernel = FakeKernel(confinement)
        self.started.append(kernel)
        return kernel


def settings(tmp_path: Path, size: int = 2) -> Settings:
    s = Settings(data_dir=tmp_path, pool_python=size, sandbox="off")
    s.sessions_dir.mkdir(parents=True, exist_ok=True)
    return s


async def filled_pool(tmp_path: Path) -> tuple[Settings, FakeLaunch, KernelPool]:
    """A pool of two fake python kernels, started and full."""
    s = settings(tmp_path)
    launch = FakeLaunch()
    pool = KernelPool(s, launch, no_warm_up)  # type: ignore[arg-type]
    pool.start()
    await until(lambda: pool.ready(PYTHON) == 2)
    return s, launch, pool


def request(s: Settings, **changes: object) -> Confinement:
    base = Confinement(workdir=s.sessions_dir / "asked", ipc_dir=s.sessions_dir / "asked",
                       mem_bytes=s.default_mem_kib * 1024)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_concurrent_takes_never_share_a_kernel_and_stock_refills(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        launch = FakeLaunch()
        pool = KernelPool(s, launch, no_warm_up)  # type: ignore[arg-type]
        pool.start()
        taken = await asyncio.gather(*(pool.take(PYTHON, request(s)) for _ in range(6)))
        ids = [k.id for k in taken if k is not None]
        assert len(ids) == 6 and len(set(ids)) == 6  # six requests, six different kernels
        # Each kernel runs in its own fresh dir, which the taker adopts.
        dirs = {k.confinement.workdir for k in taken if k is not None}
        assert len(dirs) == 6 and all(d.is_dir() and d.name.startswith("pool-") for d in dirs)
        await until(lambda: pool.ready(PYTHON) == 2)  # refilled in the background to its size
        # Takers waited, but for the first fill (a server just started): no demand in that.
        assert pool.size(PYTHON) == 2 and len(launch.started) == 2 + 6
        await pool.stop()

    asyncio.run(main())


def test_takers_that_wait_for_a_start_raise_the_stock(tmp_path: Path) -> None:
    async def main() -> None:
        s, launch, pool = await filled_pool(tmp_path)
        taken = await asyncio.gather(*(pool.take(PYTHON, request(s)) for _ in range(8)))
        assert len({k.id for k in taken if k is not None}) == 8
        # Two took ready kernels; six waited for a start: demand raised the stock by one each,
        # up to GROWTH times its configured size, and it is refilled in the background to that.
        assert pool.size(PYTHON) == min(2 + 6, GROWTH * 2)
        await until(lambda: pool.ready(PYTHON) == pool.size(PYTHON))
        # One replacement per kernel taken plus the growth, no more.
        assert len(launch.started) == 8 + pool.size(PYTHON)
        await pool.stop()

    asyncio.run(main())


def test_stock_grows_only_within_the_budgets_room_and_shrinks_when_demand_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        room = 3  # the host budget could admit three more kernels of the default cap
        pool = KernelPool(s, FakeLaunch(), no_warm_up, room=lambda: room)  # type: ignore[arg-type]
        pool.start()
        await until(lambda: pool.ready(PYTHON) == 2)
        # Two take ready kernels, three wait: the stock grows by one, not three.
        await asyncio.gather(*(pool.take(PYTHON, request(s)) for _ in range(5)))
        assert pool.size(PYTHON) == 3  # not GROWTH × 2: a stock the budget cannot admit
        await until(lambda: pool.ready(PYTHON) == 3)
        # Takes of ready kernels, no wait: once SHRINK_AFTER_S passed, one less each time.
        monkeypatch.setattr(pool_module, "SHRINK_AFTER_S", 0.0)
        assert await pool.take(PYTHON, request(s)) is not None
        assert pool.size(PYTHON) == 2
        assert await pool.take(PYTHON, request(s)) is not None
        assert pool.size(PYTHON) == 2  # never below the configured size
        await pool.stop()

    asyncio.run(main())


def test_takes_of_ready_kernels_keep_the_configured_stock(tmp_path: Path) -> None:
    async def main() -> None:
        s, launch, pool = await filled_pool(tmp_path)
        for _ in range(3):
            assert await pool.take(PYTHON, request(s)) is not None
            await until(lambda: pool.ready(PYTHON) == 2)
        assert pool.size(PYTHON) == 2 and len(launch.started) == 2 + 3
        await pool.stop()

    asyncio.run(main())


def test_requests_that_do_not_fit_get_none(tmp_path: Path) -> None:
    async def main() -> None:
        s, _, pool = await filled_pool(tmp_path)
        mount = (Mount(tmp_path, "data"),)
        for misfit in (request(s, mounts=mount), request(s, environ={"A": "1"}),
                       request(s, network=True), request(s, mem_bytes=1)):
            assert await pool.take(PYTHON, misfit) is None
        assert pool.ready(PYTHON) == 2  # nothing was taken by the misfits
        assert await pool.take(languages.resolve("go"), request(s)) is None  # size 0
        await pool.stop()

    asyncio.run(main())


def test_dead_kernel_is_skipped_and_drain_stops_everything(tmp_path: Path) -> None:
    async def main() -> None:
        s, launch, pool = await filled_pool(tmp_path)
        launch.started[0].alive = False
        got = await pool.take(PYTHON, request(s))
        assert got is not None and got is not launch.started[0] and got.alive
        await until(lambda: pool.ready(PYTHON) == 2)  # the replacements started
        await pool.stop()
        in_stock = [k for k in launch.started if k is not got]
        assert in_stock and all(k.stopped for k in in_stock)
        assert all(not k.confinement.workdir.exists() for k in in_stock)
        assert got.confinement.workdir.exists()  # handed out: its taker owns it now
        assert await pool.take(PYTHON, request(s)) is None  # drained pools hand out nothing

    asyncio.run(main())


def test_sessions_take_pooled_kernels_when_they_fit(tmp_path: Path) -> None:
    """Real kernels through the core: a default session adopts a pooled kernel and its dir."""

    async def main() -> None:
        bridge = Bridge(Settings(data_dir=tmp_path / "data", pool_python=1))
        first = await bridge.start()
        assert first.first_keypair is not None
        key = first.first_keypair.access_key
        try:
            await until(lambda: bridge.pool.ready(PYTHON) > 0, 120, "a pooled kernel")
            pooled = await bridge.sessions.create(key, PYTHON, name="pooled")
            assert bridge.pool.taken == 1
            assert pooled.main_kernel is not None
            assert pooled.workdir == pooled.main_kernel.confinement.workdir
            assert pooled.workdir.name.startswith("pool-")
            (pooled.workdir / "kept.txt").write_text("x")
            await bridge.sessions.restart(pooled)  # a restart keeps the session's files
            assert (pooled.workdir / "kept.txt").exists()
            cold = await bridge.sessions.create(key, PYTHON, name="cold", environ={"A": "1"})
            assert bridge.pool.taken == 1 and cold.workdir.name == cold.id
            for s in (pooled, cold):
                workdir = s.workdir
                await bridge.sessions.destroy(s)
                assert not workdir.exists()
        finally:
            await bridge.stop()
        leftovers = [p.name for p in bridge.settings.sessions_dir.iterdir()]
        assert leftovers == []  # the drained pool removed its kernels' dirs

    asyncio.run(main())
