"""Query latency: `print(1)` over kernel-bridge's REST API on a warm session, against the same
code through a raw jupyter_client client to a kernel started the same way (same sandbox, same
kernelspec), in one run on one machine. Prints median, p99 and their ratio.

    .venv/bin/python bench/latency.py [--n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.kernels import launch, spec_manager  # noqa: E402
from bridge.sandbox import Confinement, Sandbox  # noqa: E402
from tests.support import run_server  # noqa: E402

CODE = "print(1)"


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def raw_jupyter_client(n: int, warmup: int) -> list[float]:
    workdir = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    kernel = await launch("kb-python", Confinement(workdir=workdir, ipc_dir=workdir),
                          Sandbox("auto"), spec_manager(), 60)
    kc = kernel.client
    samples = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            msg_id = kc.execute(CODE)
            got_idle = got_reply = False
            while not got_reply:
                reply = await kc.get_shell_msg(timeout=10)
                got_reply = reply["parent_header"].get("msg_id") == msg_id
            while not got_idle:
                msg = await kc.get_iopub_msg(timeout=10)
                got_idle = (msg["parent_header"].get("msg_id") == msg_id
                            and msg["msg_type"] == "status"
                            and msg["content"]["execution_state"] == "idle")
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    finally:
        await kernel.shutdown()
    return samples


def rest(n: int, warmup: int) -> list[float]:
    samples = []
    with run_server() as server, server.client() as client:
        # requests re-reads proxy settings from os.environ on every call (~0.5 ms here);
        # that is the benchmark client's cost, not the server's.
        client.trust_env = False
        assert client.post("/session", json={"lang": "python", "name": "bench"}).status_code == 201
        for i in range(warmup + n):
            t0 = time.perf_counter()
            r = client.post("/session/bench", json={"mode": "query", "code": CODE, "runId": None})
            assert r.json()["result"]["status"] == "finished"
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    return samples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    raw = asyncio.run(raw_jupyter_client(args.n, args.warmup))
    api = rest(args.n, args.warmup)
    rows = [("raw jupyter_client", raw), ("kernel-bridge REST", api)]
    print(f"print(1) round trip, n={args.n} each, same sandboxed kb-python kernel")
    print(f"{'path':<22} {'median ms':>10} {'p99 ms':>10}")
    for name, s in rows:
        print(f"{name:<22} {statistics.median(s) * 1000:>10.2f} {pct(s, 0.99) * 1000:>10.2f}")
    print(f"ratio (REST / raw): median {statistics.median(api) / statistics.median(raw):.2f}x, "
          f"p99 {pct(api, 0.99) / pct(raw, 0.99):.2f}x")


if __name__ == "__main__":
    main()
