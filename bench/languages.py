"""Per language: cold start of a Backend.AI session (kernel launched in the sandbox, no warm
pool) and the round trip of a hello-world query on it, over REST, on one server in one run.

    .venv/bin/python bench/languages.py [--starts 3] [--n 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.languages import resolve  # noqa: E402
from tests.support import run_server  # noqa: E402
from tests.test_languages import SAMPLES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--n", type=int, default=20)
    args = p.parse_args()
    rows = []
    with run_server(pool_python="0") as server, server.client() as client:
        client.trust_env = False
        for sample in SAMPLES:
            if not resolve(sample.lang).available:
                rows.append((sample.lang, None, None))
                continue
            starts, trips = [], []
            for i in range(args.starts):
                name = f"bench-{sample.lang}-{i}"
                t0 = time.perf_counter()
                r = client.post("/session", json={"lang": sample.lang, "name": name})
                starts.append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text
                if i == 0:
                    body = {"mode": "query", "code": sample.hello, "runId": None}
                    for _ in range(args.n + 2):
                        t0 = time.perf_counter()
                        res = client.post(f"/session/{name}", json=body).json()["result"]
                        trips.append(time.perf_counter() - t0)
                        assert res["status"] == "finished", res
                    trips = trips[2:]  # the first runs warm caches (compilers, JIT)
                client.delete(f"/session/{name}")
            rows.append((sample.lang, statistics.median(starts), statistics.median(trips)))
    print(f"{'language':<12} {'cold start (median)':>20} {'hello round trip (median)':>26}")
    for lang, start, trip in rows:
        if start is None or trip is None:
            print(f"{lang:<12} {'toolchain missing':>20}")
        else:
            print(f"{lang:<12} {start * 1000:>17.0f} ms {trip * 1000:>23.1f} ms")


if __name__ == "__main__":
    main()
