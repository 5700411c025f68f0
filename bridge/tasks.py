"""Fire-and-forget tasks that cannot be garbage-collected mid-flight.

The event loop keeps only weak references to tasks; a task nobody holds may vanish before it
ends (see the asyncio.create_task docs). ``spawn`` holds it until it is done.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended (a no-op for None)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Background(abc.ABC):
    """One task that runs :meth:`forever` from :meth:`start` until :meth:`stop` (a reaper)."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = spawn(self.forever())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    @abc.abstractmethod
    async def forever(self) -> None: ...
