"""The run queue: a session's runs execute one at a time, FIFO, on one task per session.

:class:`RunQueue` is a session's own queue (``Session.queue``): what waits, what runs now.
:class:`Worker` is the registry's: it runs each session's queue and decides what a run's end
means for its session: a dead kernel puts the session in ERROR, a timed-out run destroys the
session or restarts its kernel (``Session.on_timeout``). The registry (:mod:`bridge.sessions`)
gives it the restart and destroy it may need.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import metrics
from .runs import Run, RunState
from .tasks import spawn

if TYPE_CHECKING:
    from .kernels import Kernel
    from .session import Session
    from .session_records import SessionRecords

log = logging.getLogger(__name__)

EXEC_TIMEOUT = "exec-timeout"  # the destroy reason of a session whose run timed out
RESTART_FAILED = "restart-failed"


class RunQueue:
    """A session's runs: the one running now and those waiting behind it."""

    def __init__(self) -> None:
        self._waiting: asyncio.Queue[Run] = asyncio.Queue()
        self.current: Run | None = None
        self.task: asyncio.Task[None] | None = None  # the worker's loop for this session

    @property
    def waiting(self) -> int:
        """Runs waiting for the kernel (the current one not counted)."""
        return self._waiting.qsize()

    @property
    def busy(self) -> bool:
        return self.current is not None or not self._waiting.empty()

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.done

    def put(self, run: Run) -> None:
        self._waiting.put_nowait(run)

    async def get(self) -> Run:
        return await self._waiting.get()

    def close(self, reason: str) -> None:
        """Stop the loop and cancel every waiting run (the session ended)."""
        if self.task is not None:
            self.task.cancel()
        while not self._waiting.empty():
            self._waiting.get_nowait().cancel(f"Session ended: {reason}.")


class Worker:
    """Runs every session's queue. ``restart`` and ``destroy`` are the registry's, quiet:
    a session already gone is no error."""

    def __init__(self, records: SessionRecords,
                 restart: Callable[[Session], Awaitable[None]],
                 destroy: Callable[[Session, str], Coroutine[Any, Any, None]]) -> None:
        self.records = records
        self._restart = restart
        self._destroy = destroy

    def start(self, session: Session) -> None:
        session.queue.task = spawn(self._work(session))

    async def _work(self, session: Session) -> None:
        queue = session.queue
        while True:
            run = await queue.get()
            queue.current = run
            try:
                await self._run_one(session, run)
            finally:
                # Only once the outcome is stored: a graceful shutdown waits for this.
                queue.current = None
            if run.state is RunState.TIMED_OUT and session.on_timeout == "destroy":
                return

    async def _run_one(self, session: Session, run: Run) -> None:
        try:
            await run.execute()
        finally:
            session.touch()
        # Before anything yields: a client told "finished, 130" must find the session in
        # ERROR when it looks next (poll() of a local kernel does not suspend).
        kernel = session.main_kernel
        # (A session destroyed meanwhile has no kernel left to have died.)
        died = run.state is RunState.FAILED and kernel is not None and not await kernel.is_alive()
        metrics.run_ended(run, session.language.name, died,
                          died and kernel is not None and _oom_killed(kernel))
        if died:
            session.mark_dead()
            await self.records.set_state(session)
        else:
            # The run's caller, woken by its end, answers first: its response (and, for an
            # execution, the record it persists before answering) does not queue behind this
            # row on the store's one thread.
            await asyncio.sleep(0)
        await self.records.run_ended(session, run)
        session.forget_old_runs()
        if run.state is RunState.TIMED_OUT:
            if session.on_timeout == "destroy":
                spawn(self._destroy(session, EXEC_TIMEOUT))
                return
            # Inline, not as a task: the next queued run must find the new kernel, not the
            # old one still busy with the timed-out code.
            await self._restart_or_destroy(session)

    async def _restart_or_destroy(self, session: Session) -> None:
        try:
            await self._restart(session)
        except Exception:
            log.exception("restart of session %s failed", session.id)
            await self._destroy(session, RESTART_FAILED)


def _oom_killed(kernel: Kernel) -> bool:
    cg = kernel.cgroup
    return cg is not None and cg.oom_kills() > 0
