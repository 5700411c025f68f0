"""The keeper protocol (kernelspecs/_zygote.py --plain, bridge/zygote.py), without kernels: a
spawned process gets its descriptors at the numbers its command names, its exit is reported,
and once the server's end closes the keeper keeps its children for a later server to adopt,
then leaves with the last one."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from bridge.keeper import Keeper, ZygoteUnavailable, reach, start_time
from bridge.zygote import ZygoteProcess

ROOT = Path(__file__).resolve().parents[2]


def keeper_in(tmp: Path) -> ZygoteProcess:
    return ZygoteProcess({"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, sys.executable,
                         listen=str(tmp / "k.sock"), plain=True)


def with_keeper(body: Callable[[ZygoteProcess], Awaitable[None]]) -> None:
    """Run ``body`` with a fresh plain keeper listening in a temporary dir, then stop it."""
    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            keeper = keeper_in(Path(tmp))
            await keeper.ready
            try:
                await body(keeper)
            finally:
                await keeper.stop()

    asyncio.run(scenario())


async def spawn_sh(keeper: Keeper, script: str, fds: list[int], targets: list[int]) -> int:
    pid, pidfd = await keeper.start("spawn", {
        "argv": ["/bin/sh", "-c", script], "executable": "/bin/sh", "env": {"PATH": "/bin"},
        "cwd": "/", "cgroup_procs": [], "rlimit_as": 0, "fds": targets}, fds)
    os.close(pidfd)
    return pid


async def exit_of(keeper: Keeper, pid: int, timeout: float = 10) -> int:
    async with asyncio.timeout(timeout):
        while (code := keeper.exit_status(pid)) is None:
            await asyncio.sleep(0.01)
    return code


def test_spawn_places_descriptors_and_reports_the_exit() -> None:
    async def body(keeper: ZygoteProcess) -> None:
        r, w = os.pipe()
        # The command names fd 7 (and its stdout, 1): each lands at that number.
        pid = await spawn_sh(keeper, "echo seven >&7; echo one; exit 3", [w, w], [7, 1])
        os.close(w)
        assert await exit_of(keeper, pid) == 3
        assert os.read(r, 100) == b"seven\none\n"
        os.close(r)
        with pytest.raises(ZygoteUnavailable, match="does not fork"):
            await keeper.start("fork", {"fds": []}, [])  # a plain keeper never forks

    with_keeper(body)


def test_a_keeper_outlives_its_server_and_hands_its_children_over() -> None:
    async def body(keeper: ZygoteProcess) -> None:
        r, w = os.pipe()
        pid = await spawn_sh(keeper, "read line <&5; exit 4", [r], [5])
        quick = await spawn_sh(keeper, "exit 9", [], [])
        os.close(r)
        await asyncio.sleep(0.3)
        handle = keeper.handle()
        keeper.detach()  # the server goes; the keeper keeps its children
        later = await reach(handle)
        pidfd, status = await later.adopt(pid)
        assert pidfd is not None and status is None  # alive, ours to control by pidfd
        assert (await later.adopt(quick)) == (None, 9)  # ended meanwhile: how
        with pytest.raises(ZygoteUnavailable):
            await later.adopt(1)  # not its child
        os.write(w, b"go\n")
        assert await exit_of(later, pid) == 4
        os.close(pidfd)
        os.close(w)
        await asyncio.wait_for(later.closed, 10)  # it left with its last child
        assert start_time(keeper.pid) is None
        assert not Path(handle["socket"]).exists()
        with pytest.raises(ZygoteUnavailable, match="ended while no server watched it"):
            await reach(handle)

    with_keeper(body)


def test_a_record_naming_another_process_is_refused() -> None:
    async def body(keeper: ZygoteProcess) -> None:
        wrong = {**keeper.handle(), "start": (keeper.born or 0) + 1}  # a reused pid
        with pytest.raises(ZygoteUnavailable):
            await Keeper.connect(wrong)

    with_keeper(body)


def test_stop_kills_what_the_keeper_holds() -> None:
    async def body(keeper: ZygoteProcess) -> None:
        pid = await spawn_sh(keeper, "exec sleep 60", [], [])
        await keeper.stop()
        with pytest.raises(ProcessLookupError):  # killed and reaped: no zombie left
            os.kill(pid, 0)

    with_keeper(body)


def test_spawns_in_flight_are_each_answered_at_their_exec() -> None:
    """The keeper answers a spawn once it has exec'd (or failed to), serving other requests
    meanwhile: several at once all get their answer, a failed exec its error."""
    async def body(keeper: ZygoteProcess) -> None:
        bad = keeper.start("spawn", {
            "argv": ["/nonexistent"], "executable": "/nonexistent", "env": {}, "cwd": "/",
            "cgroup_procs": [], "rlimit_as": 0, "fds": []}, [])
        good = [spawn_sh(keeper, f"exit {n}", [], []) for n in range(8)]
        results = await asyncio.gather(bad, *good, return_exceptions=True)
        assert isinstance(results[0], ZygoteUnavailable), results[0]
        assert "cannot start" in str(results[0]) and "nonexistent" in str(results[0])
        pids = results[1:]
        assert all(isinstance(p, int) for p in pids), pids
        assert [await exit_of(keeper, p) for p in pids] == list(range(8))  # type: ignore[arg-type]

    with_keeper(body)
