"""The per-kernel budget on lines of a kernel's raw stderr (kernelspecs/_logbudget.py), on a
clock of our own."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import SimpleNamespace

from kernelspecs._logbudget import LineBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_within_the_burst_pass_whole_and_split_across_chunks() -> None:
    budget = LineBudget(rate=10, burst=5, clock=Clock())
    assert budget.feed(b"one\ntw") == ["one"]
    assert budget.feed(b"o\n\nthree  \n") == ["two", "three"]  # blank: not relayed
    assert budget.feed(b"tail without newline", end=True) == ["tail without newline"]


def test_a_flood_passes_the_burst_then_the_rate_then_says_how_many_were_dropped() -> None:
    clock = Clock()
    budget = LineBudget(rate=100, burst=1000, clock=clock)
    out = budget.feed(b"x\n" * 10**6)  # ten seconds' worth of lines in one go: one chunk
    assert out == ["x"] * 1000 and budget.dropped == 10**6 - 1000
    clock.now += 0.5  # 50 lines' worth of budget come back
    out = budget.feed(b"y\n" * 200)
    assert out[0] == ("[kernel-bridge: 999000 lines of stderr dropped (more than 100 lines/s, "
                      "bursts of 1000)]")
    assert out[1:] == ["y"] * 50 and budget.dropped == 150
    assert budget.feed(b"", end=True) == [
        "[kernel-bridge: 150 lines of stderr dropped (more than 100 lines/s, bursts of 1000)]"]
    assert budget.dropped_total == 999150


def test_the_budget_refills_at_the_rate_up_to_the_burst() -> None:
    clock = Clock()
    budget = LineBudget(rate=100, burst=1000, clock=clock)
    budget.feed(b"x\n" * 1001)  # one over
    clock.now += 3600  # an hour of quiet gives back a burst, not 360000 lines
    assert len(budget.feed(b"x\n" * 5000)) == 1001  # the notice, then the burst


def test_a_line_without_newlines_is_cut_at_the_cap() -> None:
    budget = LineBudget(max_line=10, clock=Clock())
    assert budget.feed(b"a" * 25) == ["a" * 10]  # the run of 25 is cut, the rest dropped
    assert budget.feed(b"b\n") == ["b"]


def test_a_line_or_notice_the_reader_could_not_pass_on_is_counted_in_the_next_notice() -> None:
    clock = Clock()
    budget = LineBudget(rate=100, burst=2, clock=clock)
    out = budget.feed(b"a\nb\nc\nd\n")
    assert out == ["a", "b"] and budget.dropped == 2
    budget.lost("b")  # the server's socket was full
    clock.now += 1
    notice, e = budget.feed(b"e\n")
    assert notice.startswith("[kernel-bridge: 3 lines") and e == "e"
    budget.lost(notice)  # the notice itself was lost: its 3 lines are not
    assert budget.feed(b"", end=True) == [
        "[kernel-bridge: 3 lines of stderr dropped (more than 100 lines/s, bursts of 2)]"]


def test_the_zygotes_relay_never_waits_for_a_server_that_does_not_read() -> None:
    """A server that reads nothing (stopped, or slow) costs the keeper lines, never its loop:
    each send that would wait is dropped and counted."""
    from kernelspecs._zygote import Zygote

    ours, servers = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, servers:
        keeper = SimpleNamespace(control=ours, peers=[])
        budget = LineBudget(rate=1e9, burst=10**9)  # only the socket limits here

        def flood() -> None:
            for _ in range(20_000):
                Zygote.relay(keeper, "k1", "x" * 100, budget)  # type: ignore[arg-type]

        relay = threading.Thread(target=flood, daemon=True)  # a blocking send would hang it
        relay.start()
        relay.join(10)
        assert not relay.is_alive(), "the relay waited for a server that does not read"
        assert budget.dropped > 0  # the socket filled up: the rest were counted
        servers.setblocking(False)
        received = 0
        with contextlib.suppress(BlockingIOError):
            while servers.recv(1 << 16):
                received += 1
        assert received + budget.dropped == 20_000
