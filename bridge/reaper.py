"""The reaper: ends sessions that sat idle past their idle timeout or spent their CPU credit.

Limits are enforced here, never by request handlers. :func:`verdict` decides for one session
(a pure function of the session and the time); :class:`Reaper` asks it for every session every
``Settings.reaper_interval_s`` seconds and destroys what it names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from .session import Session
from .tasks import Background

log = logging.getLogger(__name__)

IDLE_TIMEOUT = "idle-timeout"
CPU_CREDIT_EXHAUSTED = "cpu-credit-exhausted"


def verdict(session: Session, now: float | None = None) -> str | None:
    """Why ``session`` should end now (a destroy reason), or None to leave it be.

    Left alone: a session already ended, one being restarted or destroyed (its lock is held),
    and one still starting (no kernel yet: not idle however long the start takes).
    """
    if not session.alive or session.lock.locked() or session.main is None:
        return None
    if session.idle(now=now):
        return IDLE_TIMEOUT
    credit = session.limits.max_cpu_credit_ms
    if credit and session.usage().cpu_ms > credit:
        return CPU_CREDIT_EXHAUSTED
    return None


class Reaper(Background):
    def __init__(self, interval: float, sessions: Callable[[], Iterable[Session]],
                 destroy: Callable[[Session, str], Awaitable[None]]) -> None:
        self.interval = interval
        self._sessions = sessions
        self._destroy = destroy

    async def forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper pass failed")

    async def reap(self) -> None:
        """One pass: destroy every session :func:`verdict` names."""
        now = time.monotonic()
        for session in list(self._sessions()):
            reason = verdict(session, now)
            if reason is not None:
                await self._destroy(session, reason)
