"""A hostile tenant floods its kernel's raw stderr (fd 2, which its keeper relays to the server's
log): the log grows by its budget (kernelspecs/_logbudget.py: 100 lines/s, bursts of 1000, then
one "N lines dropped" notice), and another tenant's kernels still start and run promptly."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from .support import Client, run_server

EX = "/api/v1/execute"
FLOOD_S = 6.0
# fd 2 as the kernel process has it (ipykernel points the Python-level fd 2 at iopub).
FLOOD = f"""
import os, sys, time
fd = sys.stderr._original_stdstream_copy
end = time.monotonic() + {FLOOD_S}
written = 0
while time.monotonic() < end:
    os.write(fd, b"x\\n" * 100_000)
    written += 100_000
time.sleep(1.5)  # the budget refills: the next line gets through, after the notice
os.write(fd, b"after the flood\\n")
print(written)
"""


@pytest.mark.parametrize("zygote", ["on", "off"])
def test_a_stderr_flood_is_cut_to_its_budget_and_others_run_on(zygote: str) -> None:
    with run_server(zygote=zygote, pool_python="0") as srv, srv.client() as attacker:
        victim = Client(srv.url, srv.new_keypair()[1])

        def victim_runs() -> list[float]:
            """Four executions, each on a fresh kernel (through the same keeper): seconds."""
            took = []
            for i in range(4):
                t = time.monotonic()
                r = victim.post(EX, json={"code": f"print({i} * 2)", "language": "python"})
                took.append(time.monotonic() - t)
                assert r.status_code == 200 and r.json()["stdout"] == f"{i * 2}\n", r.text
            return took

        calm = victim_runs()
        before = srv.log_path.stat().st_size
        flood: dict[str, Any] = {}

        def attack() -> None:
            flood["r"] = attacker.post(EX, json={"code": FLOOD, "language": "python",
                                                 "timeout": 120}, timeout=180)

        thread = threading.Thread(target=attack)
        started = time.monotonic()
        thread.start()
        time.sleep(2)  # the flood is on
        took = victim_runs()
        thread.join(180)
        elapsed = time.monotonic() - started
        r = flood["r"]
        assert r.status_code == 200, r.text
        written = int(r.json()["stdout"])
        grown = srv.log_path.stat().st_size - before
        log = srv.log()
        relayed = [line for line in log.splitlines() if re.search(r"kernel \S+: x$", line)]
        notices = re.findall(r"\[kernel-bridge: (\d+) lines of stderr dropped", log)
        print(f"\nzygote={zygote}: {written} lines written to fd 2 in {FLOOD_S:.0f} s; "
              f"{len(relayed)} relayed, {sum(map(int, notices))} counted as dropped; the log "
              f"grew {grown / 1024:.0f} KiB; the victim's executions took "
              f"{', '.join(f'{s:.2f}' for s in took)} s (before the flood: "
              f"{', '.join(f'{s:.2f}' for s in calm)} s)")
        assert written > 10 * (1000 + 100 * elapsed)  # a flood, well past the budget
        assert len(relayed) <= 1000 + 100 * elapsed
        assert notices and "after the flood" in log
        assert len(relayed) + sum(map(int, notices)) == written  # every line: relayed or counted
        assert grown < 2 * 1024 * 1024
        assert max(took) < 15, took
