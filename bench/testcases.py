"""Compile once, run many: one request with 50 test cases against 50 one-shot requests of the
same C program (each a fresh kernel that compiles it again), and a Backend.AI C session's second
query of an unchanged source (a cached build) against its first (a compile). One server, one run.

    .venv/bin/python bench/testcases.py [--cases 50] [--repeat 3] [--sources 5]
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
from tests.support import Client, run_server, run_to_end  # noqa: E402

SUM_C = """#include <stdio.h>
int main(void) { long a, b; if (scanf("%ld %ld", &a, &b) != 2) return 2;
                 printf("%ld\\n", a + b); return 0; }
"""


def one_request(client: Client, cases: list[dict[str, object]]) -> float:
    t0 = time.perf_counter()
    r = client.post("/api/v1/execute", json={"language": "c", "code": SUM_C,
                                             "test_cases": cases}, timeout=600)
    elapsed = time.perf_counter() - t0
    body = r.json()
    assert r.status_code == 200, r.text
    assert all(t["status"] == "accepted" for t in body["test_results"]), body
    return elapsed


def one_shots(client: Client, cases: list[dict[str, object]]) -> float:
    t0 = time.perf_counter()
    for case in cases:
        r = client.post("/api/v1/execute", json={"language": "c", "code": SUM_C,
                                                 "stdin": case["stdin"]}, timeout=600)
        body = r.json()
        assert r.status_code == 200 and body["stdout"] == case["expected_output"], body
    return time.perf_counter() - t0


def session_queries(client: Client, sources: int) -> tuple[list[float], list[float]]:
    """Per source: the first query's latency (compile + run), the second's (cached build)."""
    r = client.post("/session", json={"lang": "c", "name": "bench-cache"})
    assert r.status_code == 201, r.text
    first, second = [], []
    try:
        for i in range(sources):
            code = f'#include <stdio.h>\nint main(void) {{ printf("{i}\\n"); return 0; }}\n'
            for into in (first, second):
                t0 = time.perf_counter()
                results = run_to_end(client, "/session", "bench-cache", code)
                into.append(time.perf_counter() - t0)
                assert results[-1]["exitCode"] == 0, results
    finally:
        client.delete("/session/bench-cache")
    return first, second


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sources", type=int, default=5)
    args = p.parse_args()
    if not resolve("c").available:
        print("c toolchain missing (gcc): nothing to measure")
        return
    cases: list[dict[str, object]] = [
        {"stdin": f"{i} {i * 3}", "expected_output": f"{i * 4}\n", "timeout": 2,
         "memory_mb": 64} for i in range(args.cases)]
    with run_server() as server, server.client() as client:
        client.trust_env = False
        one_request(client, cases[:2])  # warm-up: toolchain caches, first kernel start
        batched = [one_request(client, cases) for _ in range(args.repeat)]
        separate = [one_shots(client, cases) for _ in range(max(1, args.repeat // 3))]
        first, second = session_queries(client, args.sources)
    b, s = statistics.median(batched), statistics.median(separate)
    print(f"C sum, {args.cases} cases")
    print(f"  one request with {args.cases} test cases   {b * 1000:9.0f} ms (median of "
          f"{len(batched)})")
    print(f"  {args.cases} one-shot requests, in turn     {s * 1000:9.0f} ms (median of "
          f"{len(separate)}; {s / args.cases * 1000:.0f} ms each)")
    print(f"  ratio                                 {s / b:9.1f}x (goal >= 5x)")
    f, c = statistics.median(first), statistics.median(second)
    print(f"Backend.AI C session, {args.sources} sources, each queried twice")
    print(f"  first query (compile + run)           {f * 1000:9.1f} ms (median)")
    print(f"  second query (cached build)           {c * 1000:9.1f} ms (median)")
    print(f"  ratio                                 {f / c:9.1f}x")


if __name__ == "__main__":
    main()
