"""The warm pool: kernels started ahead of demand, so a fresh isolated kernel is always waiting.

Per language the pool keeps ``Settings.pool_size(lang)`` kernels in stock. Each was launched
through the one launch function with the *default* confinement (its own fresh working dir, the
default memory cap, no mounts, no network, no extra environment), so it can only stand in for a
kernel that was asked for with exactly that confinement: :meth:`KernelPool.take` checks the fit and
answers ``None`` otherwise, and the caller cold-starts as before.

A stock item is the launch *task*, not only a finished kernel. A taker prefers a kernel that is
ready; if every one is still starting it claims the oldest start and awaits it (that start began
earlier than a new one would). Either way the item leaves the stock the moment it is claimed, so no
kernel is handed out twice, and one replacement start is queued behind it. Starts go through a
semaphore: ``PARALLEL_STARTS`` cold starts (each about a second of CPU: more only slow each other
down), or ``FORKED_STARTS_PER_CORE`` per core when the zygote forks them (tens of milliseconds of
CPU each, with waits on the keeper, the zygote and the kernel's first answer in between: two at
a time capped one-shots at two per start time, with a core idle).

The stock follows demand: once it has been full, a taker that finds no kernel ready (it waits
for a start) raises the language's stock by one, up to ``GROWTH`` times its configured size and
never beyond what the host memory budget could still admit (``room``); it goes back down by one
per ``SHRINK_AFTER_S`` without such a wait. Pooled kernels are not charged to the budget
(bridge/admission.py), but a stock the budget could never admit would only hold memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import metrics
from .channels import Channels
from .disk import Volumes
from .kernels import Kernel
from .languages import LANGUAGES, Language
from .sandbox import Confinement
from .settings import Settings
from .tasks import spawn

log = logging.getLogger(__name__)

Launch = Callable[[str, Confinement], Awaitable[Kernel]]
WarmUp = Callable[[Kernel, str], Awaitable[None]]

PARALLEL_STARTS = 2  # cold starts are CPU-bound; more than the cores only adds contention
FORKED_STARTS_PER_CORE = 2  # forked starts wait about as long as they compute (module doc)
GROWTH = 4  # demand may raise a language's stock to this many times its configured size
SHRINK_AFTER_S = 30.0  # a raised stock gives one kernel back per this long without a wait
# A refill waits this long first, so a cold start (a CPU-heavy second or so) does not compete with
# the execution that just took a kernel, which typically needs a few milliseconds. A kernel forked
# by the zygote costs ~50 ms of CPU: its pool refills sooner (bridge/service.py).
REFILL_DELAY_S = 0.15
WARMUP_TIMEOUT_S = 10.0
# A kernel's first execution pays for lazy imports and caches (ipykernel: ~15 ms more than the
# next); a silent one in the pool pays it before anyone waits. Languages not listed skip it
# (a compiled-language kernel would compile an empty program).
WARMUP_CODE = {"python": "pass", "javascript": "", "ruby": "", "bash": ""}
DRAIN_WAIT_S = 10.0  # at shutdown, how long starts in flight may take before they are cancelled


class KernelPool:
    """Pre-started kernels per language. ``start()`` fills it, ``stop()`` drains it."""

    def __init__(self, settings: Settings, launch: Launch, warm: WarmUp | None = None,
                 volumes: Volumes | None = None, refill_delay: float = REFILL_DELAY_S, *,
                 parallel_starts: int = PARALLEL_STARTS,
                 room: Callable[[], int] | None = None) -> None:
        """``room``: how many more kernels of the default memory cap the host budget could
        admit now (None: no bound); the stock grows with demand only within it."""
        self.settings = settings
        self.volumes = volumes or Volumes(settings)
        self.refill_delay = refill_delay
        self.parallel_starts = parallel_starts
        self._launch = launch
        self._warm = warm or warm_up
        self._room = room
        self._stock: dict[str, deque[asyncio.Task[Kernel]]] = {}
        self._starts = asyncio.Semaphore(parallel_starts)
        self._extra: dict[str, int] = {}  # kernels stocked above the configured size (demand)
        self._short_at: dict[str, float] = {}  # when a taker last had to wait for a start
        self._filled: set[str] = set()  # languages whose stock was all ready once
        self._closed = False
        self.taken = 0  # kernels handed out (for tests and the bench)

    def template(self, workdir: Path) -> Confinement:
        """The confinement every pooled kernel has; a request must match it to be served."""
        return Confinement(workdir=workdir, ipc_dir=workdir,
                           mem_bytes=self.settings.default_mem_kib * 1024)

    def fits(self, confinement: Confinement) -> bool:
        t = self.template(confinement.workdir)
        return (not confinement.mounts and not confinement.environ and not confinement.network
                and confinement.mem_bytes == t.mem_bytes and confinement.pids == t.pids)

    def size(self, language: Language) -> int:
        """The stock kept now: the configured size plus what demand added (0 stays 0)."""
        base = self.settings.pool_size(language.name)
        return base + self._extra.get(language.name, 0) if base else 0

    def _grow(self, language: Language) -> None:
        """A taker waited for a start: stock one more, within GROWTH and the budget's room."""
        name = language.name
        if name not in self._filled:
            return  # the first fill (a server just started) says nothing about demand
        self._short_at[name] = time.monotonic()
        base = self.settings.pool_size(name)
        if self.size(language) >= GROWTH * base:
            return
        if self._room is not None and self._room() <= self.size(language):
            return
        self._extra[name] = self._extra.get(name, 0) + 1

    def _shrink(self, language: Language) -> None:
        """One kernel less in the target per SHRINK_AFTER_S without a wait (the surplus goes
        out with the next takes, not discarded)."""
        name = language.name
        if self._extra.get(name) and \
                time.monotonic() - self._short_at.get(name, 0.0) >= SHRINK_AFTER_S:
            self._extra[name] -= 1
            self._short_at[name] = time.monotonic()

    def stocked(self, language: Language) -> int:
        """Kernels ready or starting for ``language``."""
        return len(self._stock.get(language.name, ()))

    def ready(self, language: Language) -> int:
        return sum(1 for t in self._stock.get(language.name, ()) if t.done()
                   and not t.cancelled() and t.exception() is None)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin filling every language with a pool size (in the background)."""
        for lang in LANGUAGES:
            if self.size(lang) > 0 and lang.available:
                self._refill(lang)

    async def stop(self) -> None:
        """Drain: no more starts; finish or cancel the ones in flight; stop every kernel."""
        self._closed = True
        tasks = [t for stock in self._stock.values() for t in stock]
        self._stock.clear()
        pending = [t for t in tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=DRAIN_WAIT_S)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        kernels = [t.result() for t in tasks
                   if t.done() and not t.cancelled() and t.exception() is None]
        await asyncio.gather(*(self._discard(k) for k in kernels), return_exceptions=True)

    # -- taking -----------------------------------------------------------------------------------

    async def take(self, language: Language, confinement: Confinement) -> Kernel | None:
        """A pooled kernel for a request with ``confinement``, or None (cold-start instead).

        The kernel's own working dir (``kernel.confinement.workdir``) becomes the caller's.
        """
        if self._closed or not self.fits(confinement):
            return None
        stock = self._stock.get(language.name)
        while stock:
            task = self._claim(stock)
            if task.done():
                self._shrink(language)
                # Later, so the refill does not compete with the execution taking this one.
                self._refill(language, self.refill_delay)
            else:
                # Demand outran the stock: more of it, and its replacement queued at once.
                metrics.POOL_WAITS.labels(language.name).inc()
                self._grow(language)
                self._refill(language)
            try:
                kernel = await asyncio.shield(task)
            except asyncio.CancelledError:
                # Our caller was cancelled while the start went on: do not leak the kernel.
                task.add_done_callback(self._discard_when_started)
                raise
            except Exception as exc:
                log.warning("pooled %s kernel failed to start: %s", language.name, exc)
                return None
            if await kernel.is_alive():
                self.taken += 1
                return kernel
            log.info("pooled %s kernel %s had died; discarding it", language.name, kernel.id)
            spawn(self._discard(kernel))
        return None

    @staticmethod
    def _claim(stock: deque[asyncio.Task[Kernel]]) -> asyncio.Task[Kernel]:
        for task in stock:
            if task.done():
                stock.remove(task)
                return task
        return stock.popleft()  # all still starting: the oldest is nearest to ready

    def _refill(self, language: Language, delay: float = 0.0) -> None:
        if self._closed:
            return
        stock = self._stock.setdefault(language.name, deque())
        while len(stock) < self.size(language):
            metrics.POOL_REFILLS.labels(language.name).inc()
            task = spawn(self._start_one(language, delay), name=f"pool-{language.name}")
            task.add_done_callback(lambda _: self._note_ready(language))
            stock.append(task)

    def _note_ready(self, language: Language) -> None:
        if language.name not in self._filled and self.ready(language) >= self.size(language):
            self._filled.add(language.name)

    async def _start_one(self, language: Language, delay: float = 0.0) -> Kernel:
        if delay:
            await asyncio.sleep(delay)
        async with self._starts:
            workdir = self.settings.sessions_dir / f"pool-{uuid.uuid4()}"
            await self.volumes.make_session_dir(workdir)  # mkfs + mount: off the hot path
            try:
                kernel = await self._launch(language.kernelspec, self.template(workdir))
            except BaseException:
                await self.volumes.remove(workdir)
                raise
            code = WARMUP_CODE.get(language.name)
            if code is not None:
                try:
                    await self._warm(kernel, code)
                except BaseException:
                    await self._discard(kernel)
                    raise
            return kernel

    def _discard_when_started(self, task: asyncio.Task[Kernel]) -> None:
        if not task.cancelled() and task.exception() is None:
            spawn(self._discard(task.result()))

    async def _discard(self, kernel: Kernel) -> None:
        with contextlib.suppress(Exception):
            await kernel.shutdown()
        await self.volumes.remove(kernel.confinement.workdir)


async def warm_up(kernel: Kernel, code: str) -> None:
    """Run ``code`` silently (no output, no history, no execution count) and wait for the
    kernel's reply and idle, so that nothing of it is left queued for the session."""
    channels = Channels(kernel.client, guarded=False)  # no user code has run in it yet
    channels.start()
    try:
        async with asyncio.timeout(WARMUP_TIMEOUT_S):
            await channels.request("execute_request", {
                "code": code, "silent": True, "store_history": False, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": False})
    finally:
        await channels.stop()
