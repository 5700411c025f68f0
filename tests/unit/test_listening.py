"""Waiting for a kernel's sockets (bridge/forked.py ``listening``), without a kernel: files that
appear in a sockets' dir wake the wait at once (inotify, one descriptor per event loop), a
process that exits first ends it, and many waits share the loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from bridge.forked import _SocketWatches, listening
from bridge.keeper import ZygoteUnavailable

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def info_in(d: Path) -> dict[str, object]:
    d.mkdir()
    return {"transport": "ipc", "ip": str(d / "k"), **{p: n for n, p in enumerate(PORTS, 1)}}


def bind_all(info: dict[str, object]) -> None:
    for p in PORTS:
        Path(f"{info['ip']}-{info[p]}").touch()


def test_sockets_appearing_end_the_wait_at_once(tmp_path: Path) -> None:
    async def scenario() -> float:
        infos = [info_in(tmp_path / f"s{i}") for i in range(8)]
        sleeper = subprocess.Popen(["sleep", "30"])
        pidfd = os.pidfd_open(sleeper.pid)
        try:
            loop = asyncio.get_running_loop()
            waits = [asyncio.create_task(listening(i, pidfd, raise_on_exit=True))
                     for i in infos]
            await asyncio.sleep(0.2)
            assert not any(w.done() for w in waits)
            t0 = time.perf_counter()
            for i in infos:
                loop.call_soon(bind_all, i)
            await asyncio.wait_for(asyncio.gather(*waits), 5)
            took = time.perf_counter() - t0
            assert not _SocketWatches.of(loop).woken  # every watch removed
            return took
        finally:
            os.close(pidfd)
            sleeper.kill()
            sleeper.wait()

    assert asyncio.run(scenario()) < 1.0


def test_a_process_that_exits_first_ends_the_wait(tmp_path: Path) -> None:
    async def scenario() -> None:
        info = info_in(tmp_path / "s")
        short = subprocess.Popen(["sleep", "0.3"])
        pidfd = os.pidfd_open(short.pid)
        try:
            with pytest.raises(ZygoteUnavailable):
                await asyncio.wait_for(listening(info, pidfd, raise_on_exit=True), 5)
            await asyncio.wait_for(listening(info, pidfd, raise_on_exit=False), 5)
        finally:
            os.close(pidfd)
            short.wait()

    asyncio.run(scenario())
