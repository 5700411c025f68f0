"""The job sessions' timers: one task that sleeps until the earliest deadline of any live job
session (or until a deadline changes) and then fires what is due.

Three deadlines per session (see :class:`bridge.jobs.JobSession`): ``max_deadline`` (max_ttl
since the first job: the session winds down), ``idle_deadline`` (interactive_ttl since the last
job: it goes inactive) and ``open_deadline`` (no job within the open TTL: it winds down).
:func:`due_action` decides what a deadline means; :class:`JobReaper` waits and fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from .jobs import JobSession, State
from .tasks import Background

log = logging.getLogger(__name__)

WindDown = Callable[[JobSession, str, float], Awaitable[None]]
Save = Callable[[JobSession], Awaitable[None]]


class Action(enum.Enum):
    WIND_DOWN = "wind-down"  # stop accepting, cancel queued jobs, close once running ones end
    INACTIVE = "inactive"  # active → inactive
    NOTHING = "nothing"  # the deadline no longer means anything (the state moved on)


def due_action(js: JobSession, due: float, open_ttl: float) -> tuple[Action, str]:
    """What the deadline ``due`` of ``js`` does now, and why (the reason it records)."""
    if due == js.max_deadline:
        return Action.WIND_DOWN, f"max_ttl of {js.max_ttl} s reached"
    if due == js.idle_deadline:
        if js.state is State.ACTIVE and not js.has_work:
            return Action.INACTIVE, f"no job for the interactive_ttl of {js.interactive_ttl} s"
        return Action.NOTHING, ""
    if js.state is State.OPEN:
        return Action.WIND_DOWN, f"no job was submitted within {open_ttl:g} s"
    return Action.NOTHING, ""


class JobReaper(Background):
    def __init__(self, live: Mapping[str, JobSession], wind_down: WindDown, save: Save,
                 open_ttl: float) -> None:
        self._live = live
        self._wind_down = wind_down
        self._save = save
        self.open_ttl = open_ttl
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A deadline may have changed: look again."""
        self._wake.set()

    async def forever(self) -> None:
        while True:
            self._wake.clear()
            deadlines = [d for js in self._live.values() if (d := js.next_deadline()) is not None]
            timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            try:
                await self.fire_due(time.time())
            except Exception:  # the reaper must outlive any one bad session
                log.exception("job-session reaper pass failed")
                await asyncio.sleep(1)

    async def fire_due(self, now: float) -> None:
        """Fire every deadline that has passed, each session's in time order (after a restart
        several may have passed), stamping each transition with its deadline."""
        for js in list(self._live.values()):
            while (due := js.next_deadline()) is not None and due <= now:
                await self._fire(js, due)

    async def _fire(self, js: JobSession, due: float) -> None:
        action, reason = due_action(js, due, self.open_ttl)
        # The deadline is spent whatever it does.
        if due == js.max_deadline:
            js.max_deadline = None
        elif due == js.idle_deadline:
            js.idle_deadline = None
        else:
            js.open_deadline = None
        if action is Action.WIND_DOWN:
            await self._wind_down(js, reason, due)
        elif action is Action.INACTIVE:
            js.transition(State.INACTIVE, reason, due)
            await self._save(js)
