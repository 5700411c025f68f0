"""bridge/admission.py on its own: places, the memory budget, the FIFO and its bound."""

from __future__ import annotations

import asyncio

import pytest

from bridge.admission import WAITING_PER_PLACE, Admission, parse_budget
from bridge.errors import HostBudgetExceeded, LimitExceeded, QuotaExceeded

GiB = 1 << 30


def h(name: str) -> tuple[str, str, str]:
    return (name, name, "backendai")


def admission(budget: int = 4 * GiB, concurrency: int = 2) -> Admission:
    return Admission(budget, lambda key: concurrency)


def test_budget_parses_percent_and_units() -> None:
    assert parse_budget("75%", 1000) == 750
    assert parse_budget("12G") == parse_budget("12GiB") == 12 * GiB
    assert parse_budget("2048") == 2048
    for bad in ("0", "0%", "150%", "lots", "-1"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_budget(bad)


def test_refusals_name_the_holders_and_the_budget() -> None:
    a = admission()
    a.reserve("k", h("session one"), GiB, wait=False)
    a.reserve("k", h("jupyter kernel two"), GiB, wait=False)
    with pytest.raises(QuotaExceeded, match=r"session one .*; jupyter kernel two "):
        a.reserve("k", h("three"), GiB, wait=False)
    a.reserve("other", h("x"), GiB, wait=False)
    with pytest.raises(HostBudgetExceeded, match="memory budget"):
        a.reserve("other", h("y"), 2 * GiB, wait=False)
    with pytest.raises(LimitExceeded, match="maxMem"):
        a.reserve("other", h("huge"), 5 * GiB, wait=True)
    assert a.mem_used == 3 * GiB


def test_waiters_are_granted_in_order_and_the_queue_is_bounded() -> None:
    asyncio.run(_waiters_in_order())


async def _waiters_in_order() -> None:
    a = admission(concurrency=1)
    first = a.reserve("k", h("first"), GiB, wait=False)
    queued = [a.reserve("k", f"w{i}", GiB, wait=True) for i in range(WAITING_PER_PLACE)]
    with pytest.raises(QuotaExceeded, match="already waiting"):
        a.reserve("k", h("one too many"), GiB, wait=True)
    assert not any(t.granted for t in queued)
    a.release(first)
    assert [t.granted for t in queued] == [True, False, False, False]
    await a.wait(queued[0], None)
    a.release(queued[0])
    assert queued[1].granted and a.held("k") == 1


def test_a_wait_that_times_out_is_withdrawn() -> None:
    asyncio.run(_wait_times_out())


async def _wait_times_out() -> None:
    a = admission(concurrency=1)
    a.reserve("k", h("holder"), GiB, wait=False)
    late = a.reserve("k", h("late"), GiB, wait=True)
    loop = asyncio.get_running_loop()
    with pytest.raises(QuotaExceeded, match="holder"):
        await a.wait(late, loop.time() + 0.05)
    assert a.waiting("k") == 0 and not late.granted


def test_a_waiter_blocked_on_memory_is_not_starved_by_smaller_ones() -> None:
    a = admission(budget=3 * GiB, concurrency=5)
    held = a.reserve("a", h("held"), 2 * GiB, wait=False)
    big = a.reserve("b", h("big"), 2 * GiB, wait=True)
    small = a.reserve("c", h("small"), GiB // 2, wait=True)  # would fit now, but comes later
    assert not big.granted and not small.granted
    a.release(a.reserve("c", h("now"), GiB // 2, wait=False))  # a release runs the queue
    assert not big.granted and not small.granted
    a.release(held)
    assert big.granted and small.granted


def test_a_dialect_may_have_more_places_and_still_counts_every_kernel() -> None:
    a = admission(concurrency=1)
    a.reserve("k", h("session"), GiB, wait=False)
    with pytest.raises(QuotaExceeded, match="at most 1 concurrent"):
        a.reserve("k", h("another session"), GiB, wait=False)
    a.reserve("k", h("jupyter kernel"), GiB, wait=False, places=2)
    with pytest.raises(QuotaExceeded, match="at most 2 concurrent"):
        a.reserve("k", h("jupyter kernel 2"), GiB, wait=False, places=2)


def test_grow_charges_a_batch_kernel_and_shrink_gives_it_back() -> None:
    a = admission(budget=2 * GiB)
    t = a.reserve("k", h("s"), GiB, wait=False)
    a.grow(t, GiB)
    with pytest.raises(HostBudgetExceeded):
        a.grow(t, GiB)
    a.shrink(t, GiB)
    a.release(t)
    assert a.mem_used == 0 and a.held("k") == 0


def test_places_held_on_other_replicas_count() -> None:
    a = admission(concurrency=3)
    elsewhere = {"k": 2}
    a.elsewhere = lambda key: elsewhere.get(key, 0)
    a.reserve("k", h("here"), GiB, wait=False)  # 1 here + 2 elsewhere = 3: full
    with pytest.raises(QuotaExceeded):
        a.reserve("k", h("one too many"), GiB, wait=False)
    a.reserve("other", h("unaffected"), GiB, wait=False)
    elsewhere["k"] = 1  # a session on another replica ended
    a.reserve("k", h("fits again"), GiB, wait=False)
