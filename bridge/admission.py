"""Admission: whether a kernel may start, decided in one place for every dialect.

Two budgets, both charged before a kernel starts and given back once it is gone:

* **Places.** A keypair's ``concurrency`` is a number of places. Everything that holds a kernel
  for it holds one: a Backend.AI session, a Sandbox one-shot execution or ``session_id``
  session, a job session's or a batch job's kernel, a Jupyter kernel, a notebook run.
* **Host memory.** The memory caps of admitted kernels add up to at most the host budget
  (``KB_HOST_MEMORY_BUDGET``, default 75% of RAM). A session is charged its cap; its batch bash
  kernel, which has its own cgroup with the same cap, adds that cap when it starts (:meth:`grow`).
  Pooled kernels are not charged: they run no user code until a session takes one, and that
  session was charged first. A kernel without a cap (``KB_DEFAULT_MEM_KIB=0``, an operator's
  choice) is charged nothing.

Callers that can wait (one-shot executions, batch jobs: they have a timeout) queue FIFO, at most
``WAITING_PER_PLACE`` × concurrency per keypair; a full queue refuses at once. Callers that cannot
(sessions) are refused at once. Either refusal names what holds the keypair's places.

A waiter blocked on its keypair's places does not hold up other keypairs; one blocked on memory
holds up every later waiter that needs memory, so a big request is not starved by small ones.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from . import metrics
from .errors import HostBudgetExceeded, LimitExceeded, QuotaExceeded

WAITING_PER_PLACE = 4
# (name, id, origin) of what holds a place: a session's name, id and dialect, or an execution's
# or a batch job's id twice with "execution" / "job" (QuotaExceeded says how to free each).
Holder = tuple[str, str, str]
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_budget(value: str, total: int | None = None) -> int:
    """Bytes from ``"75%"`` (of ``total``, default the host's RAM), ``"12884901888"`` or
    ``"12G"``/``"12GiB"``. Raises ValueError naming the value."""
    m = _BUDGET.match(value)
    if m is None:
        raise ValueError(f"not a byte count or a percentage of RAM: {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"a percentage of RAM must be in (0, 100]: {value!r}")
        ram = total if total is not None else psutil.virtual_memory().total
        return int(ram * number / 100)
    result = int(number * _UNITS[unit[:1]])
    if result <= 0:
        raise ValueError(f"the budget must be more than 0 bytes: {value!r}")
    return result


@dataclass(eq=False)
class Ticket:
    """One admission: a place of ``access_key`` and ``mem_bytes`` of the host budget."""

    access_key: str
    holder: Holder  # what holds the place, as a refusal names it
    mem_bytes: int
    places: int  # how many kernels the keypair may hold in all, this one counted
    granted: bool = False
    released: bool = False
    _granted: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class Admission:
    def __init__(self, budget_bytes: int, concurrency: Callable[[str], int]) -> None:
        self.budget = budget_bytes
        self._concurrency = concurrency
        self._held: dict[str, list[Ticket]] = {}
        self._waiting: deque[Ticket] = deque()
        self.mem_used = 0
        # Places a keypair holds on other replicas (bridge/replicas.py keeps the count): its
        # concurrency covers every kernel it holds in the cluster.
        self.elsewhere: Callable[[str], int] = lambda access_key: 0

    # -- what the refusals and tests see -------------------------------------------------------

    def holders(self, access_key: str) -> tuple[Holder, ...]:
        return tuple(t.holder for t in self._held.get(access_key, []))

    def held(self, access_key: str) -> int:
        return len(self._held.get(access_key, []))

    def waiting(self, access_key: str | None = None) -> int:
        """Tickets queued for this keypair (all keypairs: None, as the metrics report it)."""
        return sum(1 for t in self._waiting if access_key in (None, t.access_key))

    # -- reserving ------------------------------------------------------------------------------

    def reserve(self, access_key: str, holder: Holder, mem_bytes: int, *, wait: bool,
                places: int | None = None) -> Ticket:
        """A ticket, granted now or (``wait``) queued; :meth:`wait` for a queued one. ``places``:
        how many kernels in all the keypair may hold counting this one (default: its
        concurrency; Jupyter kernels get more, see ``Settings.concurrency_for``).

        Raises LimitExceeded (a cap above the whole budget), QuotaExceeded (no place, or the
        queue is full), HostBudgetExceeded.
        """
        if mem_bytes > self.budget:
            raise LimitExceeded("maxMem", mem_bytes // 1024, self.budget // 1024)
        ticket = Ticket(access_key, holder, mem_bytes,
                        places if places is not None else self._concurrency(access_key))
        if not wait:
            if not (self._place_free(ticket) and self._memory_free(mem_bytes)):
                raise self._refusal(ticket)
            self._grant(ticket)
            return ticket
        # Behind whoever waits already: a waiter is never overtaken by a later one.
        self._waiting.append(ticket)
        self._pump()
        limit = ticket.places
        if not ticket.granted and self.waiting(access_key) > WAITING_PER_PLACE * limit:
            self._waiting.remove(ticket)
            raise QuotaExceeded(limit, self.holders(access_key),
                                f"{self.waiting(access_key)} more are already waiting, "
                                "the most this keypair may queue.")
        return ticket

    def adopt(self, access_key: str, holder: Holder, mem_bytes: int) -> Ticket:
        """A ticket granted whatever the limits say now: for a kernel a previous server
        started (bridge/adoption.py), which runs already and keeps its place."""
        ticket = Ticket(access_key, holder, mem_bytes, self._concurrency(access_key))
        self._grant(ticket)
        return ticket

    async def wait(self, ticket: Ticket, until: float | None) -> None:
        """Until ``ticket`` is granted, or the loop time ``until``: then it is withdrawn and the
        refusal raised (QuotaExceeded or HostBudgetExceeded)."""
        if ticket.granted:
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout_at(until):
                await ticket._granted.wait()
            metrics.ADMISSION_WAIT.observe(time.monotonic() - started)
        except TimeoutError:
            if ticket.granted:  # granted in the same instant
                return
            self.release(ticket)
            raise self._refusal(ticket) from None
        except BaseException:
            self.release(ticket)  # the caller gave up (cancelled): do not leak the grant
            raise

    def grow(self, ticket: Ticket, mem_bytes: int) -> None:
        """Charge another kernel's cap to a granted ticket. Raises HostBudgetExceeded."""
        if not self._memory_free(mem_bytes):
            raise HostBudgetExceeded(mem_bytes, self.budget - self.mem_used, self.budget)
        ticket.mem_bytes += mem_bytes
        self.mem_used += mem_bytes

    def shrink(self, ticket: Ticket, mem_bytes: int) -> None:
        """Give back what :meth:`grow` charged (the kernel did not start)."""
        if ticket.granted and not ticket.released:
            ticket.mem_bytes -= mem_bytes
            self.mem_used -= mem_bytes
            self._pump()

    def release(self, ticket: Ticket) -> None:
        """Give the place and the memory back (idempotent); waiters that now fit are granted."""
        if ticket.released:
            return
        ticket.released = True
        if ticket.granted:
            self._held[ticket.access_key].remove(ticket)
            self.mem_used -= ticket.mem_bytes
        elif ticket in self._waiting:
            self._waiting.remove(ticket)
        self._pump()

    # -- internals -------------------------------------------------------------------------------

    def _place_free(self, ticket: Ticket) -> bool:
        key = ticket.access_key
        return self.held(key) + self.elsewhere(key) < ticket.places

    def _memory_free(self, mem_bytes: int) -> bool:
        return self.mem_used + mem_bytes <= self.budget

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        self._held.setdefault(ticket.access_key, []).append(ticket)
        self.mem_used += ticket.mem_bytes
        ticket._granted.set()

    def _refusal(self, ticket: Ticket) -> QuotaExceeded:
        if not self._place_free(ticket):
            return QuotaExceeded(ticket.places, self.holders(ticket.access_key))
        return HostBudgetExceeded(ticket.mem_bytes, self.budget - self.mem_used, self.budget)

    def _pump(self) -> None:
        blocked: set[str] = set()  # keypairs whose earliest waiter cannot start
        memory_blocked = False
        for ticket in list(self._waiting):
            if ticket.access_key in blocked:
                continue
            if not self._place_free(ticket):
                blocked.add(ticket.access_key)
            elif ticket.mem_bytes and (memory_blocked or not self._memory_free(ticket.mem_bytes)):
                memory_blocked = True
                blocked.add(ticket.access_key)
            else:
                self._waiting.remove(ticket)
                self._grant(ticket)
