"""Waiting for a condition with a deadline, for tests in the event loop: poll, never sleep a
fixed time and then count (a loaded machine is slow; a condition never met is a failure)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], timeout: float = 30.0,
                what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g} s"
        await asyncio.sleep(0.01)
