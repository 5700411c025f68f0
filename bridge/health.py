"""Readiness: may a load balancer send this server work now? (``GET /readyz``; api/ops.py.)

Three things, each cheap: the store answers a query; the sandbox still works (the bubblewrap the
server resolved at start still runs a confined ``true``: a package upgrade or a changed sysctl
breaks it under a running server), probed at most every ``SANDBOX_TTL_S``; the warm pool has
filled once since start (after that an empty pool means busy, not broken).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .doctor import probe_argv

if TYPE_CHECKING:
    from .service import Bridge

SANDBOX_TTL_S = 5.0
PROBE_TIMEOUT_S = 5.0


@dataclass
class Readiness:
    checks: dict[str, str]  # name → "ok" or what is wrong

    @property
    def ready(self) -> bool:
        return all(v == "ok" for v in self.checks.values())


class Health:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._sandbox: tuple[float, str] | None = None
        self._lock = asyncio.Lock()
        self._warmed = False

    async def readiness(self) -> Readiness:
        return Readiness({"store": await self._store(), "sandbox": await self._sandbox_ok(),
                          "pool": self._pool()})

    async def _store(self) -> str:
        try:
            await asyncio.wait_for(self.bridge.store.fetchone("SELECT 1"), PROBE_TIMEOUT_S)
        except Exception as exc:
            return f"store unreachable: {type(exc).__name__}: {exc}"
        return "ok"

    async def _sandbox_ok(self) -> str:
        sandbox = self.bridge.sandbox
        if not sandbox.enabled or sandbox.bwrap is None:
            return "ok"  # KB_SANDBOX=off: the operator's choice, warned about at start
        async with self._lock:  # one probe at a time; the others read its answer
            now = time.monotonic()
            if self._sandbox is None or now - self._sandbox[0] > SANDBOX_TTL_S:
                self._sandbox = (now, await _probe_bwrap(sandbox.bwrap))
            return self._sandbox[1]

    def _pool(self) -> str:
        if self._warmed:
            return "ok"
        from .languages import LANGUAGES

        pool = self.bridge.pool
        cold = [lang.name for lang in LANGUAGES
                if pool.size(lang) and lang.available and pool.ready(lang) < 1]
        if cold:
            return f"warming: {', '.join(cold)}"
        self._warmed = True
        return "ok"


async def _probe_bwrap(bwrap: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *probe_argv(bwrap), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        return f"sandbox broken: {bwrap}: {exc.strerror or exc}"
    try:
        _, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return f"sandbox broken: {bwrap} did not answer in {PROBE_TIMEOUT_S:g} s"
    if proc.returncode != 0:
        return f"sandbox broken: {bwrap}: {err.decode(errors='replace').strip()}"
    return "ok"
