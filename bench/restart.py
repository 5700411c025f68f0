"""Time to ready after a crash with N idle sessions (issue 15).

    python bench/restart.py [--sessions 50] [--rounds 1]

Starts a real server, makes ``--sessions`` Backend.AI Python sessions each holding a variable,
kills the server with SIGKILL and starts another on the same data dir. Prints, per round: the
seconds from the new process's spawn to "listening" (the server answers only once every session
is re-adopted), the re-adoption alone (from the server's log), and the seconds until every
session has answered ``print(v)`` with its own value (all adopted, state intact); and, for
scale, the same start on an empty data dir.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Client, run_server  # noqa: E402

SETTINGS = {"pool_python": "0", "default_concurrency": "200", "default_mem_kib": "262144"}


def query(c: Client, name: str, code: str) -> str:
    r = c.post(f"/session/{name}", json={"mode": "query", "code": code, "runId": None})
    r.raise_for_status()
    result = r.json()["result"]
    return "".join(text for kind, text in result["console"] if kind == "stdout")


def one_round(n: int) -> tuple[float, float, float, float]:
    with tempfile.TemporaryDirectory(prefix="kb-bench-") as tmp:
        data = Path(tmp) / "data"
        started = time.monotonic()
        with run_server(data, **SETTINGS) as first:
            empty_ready = time.monotonic() - started
            c = first.client()
            secret = first.secret_key

            def make(i: int) -> None:
                r = c.post("/session", json={"lang": "python", "name": f"sess{i}"})
                r.raise_for_status()
                query(c, f"sess{i}", f"v = {i}")

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(make, range(n)))
            first.process.kill()
            first.process.wait()
        started = time.monotonic()
        with run_server(data, **SETTINGS) as second:
            ready = time.monotonic() - started
            c = second.client(secret)
            with ThreadPoolExecutor(8) as pool:
                outs = list(pool.map(lambda i: query(c, f"sess{i}", "print(v)"), range(n)))
            answered = time.monotonic() - started
            assert outs == [f"{i}\n" for i in range(n)], outs
            m = re.search(r"re-adopted (\d+) session\(s\) in ([\d.]+) s", second.log())
            assert m is not None and int(m.group(1)) == n, second.log()[-2000:]
            return ready, float(m.group(2)), answered, empty_ready


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    rounds = [one_round(args.sessions) for _ in range(args.rounds)]
    for ready, adopt, answered, empty in rounds:
        print(f"{args.sessions} idle sessions after kill -9: listening {ready:.2f} s after spawn "
              f"(re-adoption {adopt:.2f} s of it), all answered {answered:.2f} s after spawn; "
              f"an empty data dir: listening {empty:.2f} s after spawn")
    if len(rounds) > 1:
        print(f"median listening: {statistics.median(r[0] for r in rounds):.2f} s")


if __name__ == "__main__":
    main()
