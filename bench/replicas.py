"""Replicas (issue 16): what forwarding costs, and what a second replica adds.

    .venv/bin/python bench/replicas.py [--n 200] [--clients 8] [--total 48] [--rounds 2]

Two real replicas on one throw-away PostgreSQL (tests/pg.py) and one data dir, on this machine:

* query round trip: Backend.AI ``print(1)`` on a warm session owned by replica 1, sent to
  replica 1 (the owner, served directly) and to replica 2 (which looks the owner up and forwards,
  signed), sampled in turn so both see the same load; medians, p99 and the ratio;
* one-shot throughput: ``--total`` Sandbox one-shots (a fresh pooled kernel each) from
  ``--clients`` concurrent clients, all sent to replica 1, then spread over both; the ratio.
  Both replicas run on the same cores here, so this shows the overhead of spreading, not the
  capacity a second host would add.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pg import postgres_cluster  # noqa: E402
from tests.support import Client, Server, run_server  # noqa: E402

QUERY = {"mode": "query", "code": "print(1)", "runId": None}
ONE_SHOT = {"code": "print(1)", "language": "python"}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def keypair(server: Server, concurrency: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--data-dir", str(server.data_dir),
         "--concurrency", str(concurrency), "--json"], capture_output=True, text=True,
        check=True, cwd=ROOT, env={**os.environ, **server.env})
    return str(json.loads(out.stdout)["secret_key"])


def timed_query(client: Client) -> float:
    t = time.perf_counter()
    r = client.post("/kernel/bench", json=QUERY)
    elapsed = time.perf_counter() - t
    if r.status_code != 200 or r.json()["result"]["console"] != [["stdout", "1\n"]]:
        raise RuntimeError(f"bad answer: {r.status_code} {r.text}")
    return elapsed


def one_shot(client: Client) -> str | None:
    """None, or what was wrong with the answer."""
    r = client.post("/api/v1/execute", json=ONE_SHOT)
    if r.status_code != 200 or r.json()["stdout"] != "1\n":
        return f"{r.status_code} {r.text[:200]}"
    return None


def throughput(clients: list[Client], total: int, workers: int) -> tuple[float, list[str]]:
    """One-shots a second, ``total`` of them, round-robin over ``clients``; and the answers
    that were not ``1``."""
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        bad = [b for b in pool.map(lambda i: one_shot(clients[i % len(clients)]), range(total))
               if b is not None]
    return total / (time.perf_counter() - started), bad


def tracebacks(*servers: Server) -> str:
    return "\n".join(line for s in servers for line in s.log().splitlines()
                     if "Error" in line or "Traceback" in line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="query samples per path")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--total", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    env = {"pool_python": "2", "rate_limit": "1000000", "lease_s": "15"}
    with postgres_cluster() as cluster, tempfile.TemporaryDirectory(prefix="kb-bench-") as tmp:
        url = cluster.create_database()
        data = Path(tmp) / "data"
        with run_server(data, database_url=url, **env) as one, \
                run_server(data, database_url=url, **env) as two:
            secret = keypair(one, 64)
            c1, c2 = Client(one.url, secret), Client(two.url, secret)
            r = c1.post("/kernel/create", json={"lang": "python", "clientSessionToken": "bench"})
            assert r.status_code == 201, r.text
            for _ in range(20):  # warm both paths
                timed_query(c1)
                timed_query(c2)
            direct: list[float] = []
            forwarded: list[float] = []
            for _ in range(args.n):
                direct.append(timed_query(c1))
                forwarded.append(timed_query(c2))
            c1.delete("/kernel/bench")
            d, f = statistics.median(direct), statistics.median(forwarded)
            print(f"query round trip, owner directly: median {d * 1000:.2f} ms, "
                  f"p99 {pct(direct, 99) * 1000:.2f} ms (n={args.n})")
            print(f"query round trip, forwarded by replica 2: median {f * 1000:.2f} ms, "
                  f"p99 {pct(forwarded, 99) * 1000:.2f} ms (n={args.n})")
            print(f"forwarded / direct: {f / d:.2f}x (+{(f - d) * 1000:.2f} ms)")

            throughput([c1, c2], 8, args.clients)  # warm the pools on both
            # In turn, twice: the machine's load drifts by the minute.
            alone: list[float] = []
            spread: list[float] = []
            bad: list[str] = []
            for _ in range(args.rounds):
                for clients, rates in (([c1], alone), ([c1, c2], spread)):
                    time.sleep(3)  # the pools refill
                    rate, failed = throughput(clients, args.total, args.clients)
                    rates.append(rate)
                    bad += failed
            a, s2 = statistics.median(alone), statistics.median(spread)
            print(f"one-shots, all to replica 1: {', '.join(f'{r:.2f}' for r in alone)}/s;"
                  f" spread over two replicas: {', '.join(f'{r:.2f}' for r in spread)}/s"
                  f" ({args.total} each from {args.clients} clients)")
            print(f"two replicas / one (medians): {s2 / a:.2f}x")
            if bad:
                print(f"failed one-shots: {len(bad)}: {bad[:3]}\n"
                      f"{tracebacks(one, two)[-3000:]}")
        cluster.drop_database(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
