"""The store's cost, SQLite against PostgreSQL: one store call in-process (a row upserted, a row
read, a lease taken), and a Backend.AI `print(1)` query round trip through the real server on
each backend, sampled in turn. PostgreSQL is a throw-away local cluster (tests/pg.py) with
fsync on (durable commits, as deployed); `--no-fsync` measures it as the tests run it.

    .venv/bin/python bench/store.py [--n 300] [--no-fsync]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import rest_once  # noqa: E402
from bridge.store import SqliteStore, Store, upsert  # noqa: E402
from bridge.store.postgres import PostgresStore  # noqa: E402
from tests.pg import postgres_cluster  # noqa: E402
from tests.support import run_server  # noqa: E402

SAVE = upsert("vfolder_permissions", ["folder_id", "access_key", "permission"],
              ["folder_id", "access_key"])


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def line(name: str, s: list[float]) -> str:
    return f"{name:<34} {statistics.median(s) * 1000:>9.3f} {pct(s, 0.99) * 1000:>9.3f}"


async def store_ops(stores: dict[str, Store], n: int) -> dict[str, list[float]]:
    ops: dict[str, Callable[[Store, int], Awaitable[object]]] = {
        "upsert": lambda s, i: s.execute(SAVE, ("f", "ak", f"p{i}")),
        "fetchone": lambda s, i: s.fetchone(
            "SELECT permission FROM vfolder_permissions WHERE folder_id = ?", ("f",)),
        "try_lease": lambda s, i: s.try_lease("bench", "me", 30),
    }
    samples: dict[str, list[float]] = {f"{op} {b}": [] for op in ops for b in stores}
    for i in range(n + 20):
        for op, fn in ops.items():
            for b, store in stores.items():
                t0 = time.perf_counter()
                await fn(store, i)
                if i >= 20:
                    samples[f"{op} {b}"].append(time.perf_counter() - t0)
    return samples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--no-fsync", action="store_true")
    args = p.parse_args()
    fsync = not args.no_fsync
    with postgres_cluster(fsync=fsync) as cluster:
        url = cluster.create_database()

        async def ops() -> dict[str, list[float]]:
            stores: dict[str, Store] = {
                "sqlite": SqliteStore(Path(tempfile.mkdtemp(prefix="kb-bench-")) / "db.sqlite3"),
                "postgres": PostgresStore(url)}
            for s in stores.values():
                await s.open()
            try:
                return await store_ops(stores, args.n)
            finally:
                for s in stores.values():
                    await s.close()

        samples = asyncio.run(ops())
        rest: dict[str, list[float]] = {"query via server, sqlite": [],
                                        "query via server, postgres": []}
        with run_server() as lite, run_server(database_url=cluster.create_database()) as pg, \
                lite.client() as a, pg.client() as b:
            clients = [a, b]
            for c in clients:
                c.trust_env = False  # requests' proxy lookup is the client's cost
                assert c.post("/session", json={"lang": "python", "name": "bench"}
                              ).status_code == 201
            for i in range(args.n + 20):
                got = [rest_once(c) for c in clients]
                if i >= 20:
                    for key, value in zip(rest, got, strict=True):
                        rest[key].append(value)
    print(f"store cost, n={args.n} each, sampled in turn; PostgreSQL "
          f"{'with' if fsync else 'without'} fsync, local, over TCP on 127.0.0.1")
    print(f"{'what':<34} {'median ms':>9} {'p99 ms':>9}")
    for name, s in {**samples, **rest}.items():
        print(line(name, s))
    lite_s, pg_s = rest["query via server, sqlite"], rest["query via server, postgres"]
    print(f"query round trip postgres / sqlite: median "
          f"{statistics.median(pg_s) / statistics.median(lite_s):.2f}x, "
          f"p99 {pct(pg_s, 0.99) / pct(lite_s, 0.99):.2f}x")


if __name__ == "__main__":
    main()
