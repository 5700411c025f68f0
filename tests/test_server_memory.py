"""The server's own memory is bounded whatever a kernel sends (issue 11, F5).

An attacker's kernel writes raw messages on its iopub socket through ipykernel's own session
(signed, so they pass for the kernel's): huge ones (over the socket's size cap), big ones under
it, with random parents and with the parent of the attacker's own run. The server's RSS must not
follow, a victim tenant's ``print(1)`` must stay fast meanwhile, and the attacker's session must
go on answering.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import requests

from .support import Client, Server, console_text, create_session, run_server, run_to_end

MB = 1000 * 1000

FLOOD = """
import json, uuid, time
k = get_ipython().kernel
parent = k.get_parent() if hasattr(k, "get_parent") else k._parent_header
blob = json.dumps({{"name": "stdout", "text": "x" * {size}}}).encode()
for i in range({count}):
    p = parent if {own} else {{"msg_id": uuid.uuid4().hex, "msg_type": "execute_request"}}
    k.session.send(k.iopub_socket, "stream", blob, parent=p)
    time.sleep(0.02)
print("flood done", flush=True)
"""


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with run_server(pool_python="0") as s:
        yield s


def create(api: Client, **body: Any) -> str:
    return create_session(api, "mem", **body)


class Sampler(threading.Thread):
    """Samples the server's RSS and a victim's print(1) latency until stopped."""

    def __init__(self, srv: Server, victim: Client, session: str) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(srv.process.pid)
        self.victim, self.session = victim, session
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            results = run_to_end(self.victim, "/session", self.session, "print(1)")
            self.latencies.append(time.monotonic() - t)
            assert console_text(results, "stdout") == "1\n"
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def finish(self) -> tuple[float, float, float]:
        """(RSS growth in MB, median and max victim latency in s)."""
        self.stop.set()
        self.join(timeout=30)
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return ((self.peak - self.baseline) / MB, statistics.median(self.latencies),
                max(self.latencies))


@pytest.mark.parametrize(("size", "own"), [
    (50 * MB, False),  # over the socket's cap: refused before the server allocates it
    (50 * MB, True),
    (12 * MB, False),  # under the cap: dropped undecoded (no live request)
    (12 * MB, True),   # the attacker's own run: kept up to its output limit, then dropped
])
def test_iopub_flood_does_not_inflate_the_server(srv: Server, size: int, own: bool) -> None:
    _, secret = srv.new_keypair()
    with srv.client() as attacker, srv.client(secret) as victim:
        bad = create(attacker, limits={"maxMem": 3 * 1024 * 1024})
        good = create(victim)
        run_to_end(victim, "/session", good, "print(0)")
        run_to_end(attacker, "/session", bad, "print(0)")
        sampler = Sampler(srv, victim, good)
        sampler.start()
        t = time.monotonic()
        results = run_to_end(attacker, "/session", bad, FLOOD.format(size=size, count=30,
                                                                         own=own))
        flood_s = time.monotonic() - t
        time.sleep(1)  # messages still in flight
        grown, median, worst = sampler.finish()
        print(f"\nflood of 30 x {size // MB} MB (own parent: {own}) in {flood_s:.1f} s: "
              f"server RSS +{grown:.0f} MB; victim print(1) median {median * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms over {len(sampler.latencies)} runs")
        out, err = console_text(results, "stdout"), console_text(results, "stderr")
        assert results[-1]["status"] == "finished", results[-1]
        assert grown < 200, grown
        assert worst < 1.0, sampler.latencies
        if own and size > 16 * 1024 * 1024:
            # Refused at the socket: the run says a message was lost, it is not silent.
            assert "connection was reset" in err, err[-500:]
        if own and size < 16 * 1024 * 1024:
            # The first one is kept up to the run's output limit, the rest counted as dropped.
            assert 3 * 1024 * 1024 <= len(out) <= 4 * 1024 * 1024 + 100, len(out)
            assert "output limit" in err and "dropped" in err, err[-300:]
        # The attacker's session goes on working.
        again = run_to_end(attacker, "/session", bad, "print(6 * 7)")
        assert console_text(again, "stdout") == "42\n", again
        attacker.delete(f"/session/{bad}")
        victim.delete(f"/session/{good}")


def test_a_big_print_is_cut_not_lost(srv: Server) -> None:
    with srv.client() as api:
        name = create(api)
        # A 20 MB print is more than a kernel message may carry: our Python kernel sends its
        # output in pieces, so the run keeps its output limit's worth, as before the cap.
        results = run_to_end(api, "/session", name, "print('y' * 20_000_000)\nprint('after')")
        assert results[-1]["status"] == "finished", results[-1]
        out, err = console_text(results, "stdout"), console_text(results, "stderr")
        assert out == "y" * (4 * 1024 * 1024), len(out)
        assert "output limit" in err and "connection was reset" not in err, err[-300:]
        assert console_text(run_to_end(api, "/session", name, "print(2)"), "stdout") == "2\n"
        api.delete(f"/session/{name}")


def test_a_jupyter_client_that_does_not_read_cannot_make_the_server_buffer_a_flood(
        srv: Server) -> None:
    from .jupyter_support import KernelSocket, execute_request

    r = requests.post(srv.url + "/api/kernels", json={"name": "python3"}, timeout=60,
                      headers={"Authorization": f"token {srv.secret_key}"})
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    ws = KernelSocket(srv.url, kernel_id, srv.secret_key)
    proc = psutil.Process(srv.process.pid)
    before = peak = proc.memory_info().rss
    # 40 x 12 MB of output for a client that never reads a frame.
    ws.send("shell", execute_request(FLOOD.format(size=12 * MB, count=40, own=True)))
    t = time.monotonic()
    while time.monotonic() - t < 20:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.05)
    grown = (peak - before) / MB
    print(f"\nnon-reading Jupyter client, 40 x 12 MB flood: server RSS +{grown:.0f} MB")
    assert grown < 200, grown
    ws.ws.close()
    assert requests.get(srv.url + "/", timeout=10).status_code == 200
    requests.delete(f"{srv.url}/api/kernels/{kernel_id}", timeout=60,
                    headers={"Authorization": f"token {srv.secret_key}"})
