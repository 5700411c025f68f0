"""Query latency: `print(1)` over kernel-bridge's REST API on a warm session, against the same
code straight through jupyter_client to a plain unsandboxed ipykernel and to a kernel started
like the server's (same sandbox, same kernelspec). Prints median, p99 and the ratios.

    .venv/bin/python bench/latency.py [--n 300]

The three paths are sampled in turn (raw, raw sandboxed, REST, raw, …) in one run: on a shared
machine the load changes by the second, and measuring one path after the other attributed that
change to whichever ran during the busier minute (issue 14 measured 1.75x that way; sampled in
turn the REST path costs what its HTTP hop costs).

The REST path is sampled with two clients: ``requests`` (what the tests and most Python users
use; about a millisecond of its own per call) and a keep-alive ``http.client`` connection, whose
round trip is the server's plus the loopback's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.kernels import Kernel, launch, spec_manager  # noqa: E402
from bridge.sandbox import Confinement, Sandbox  # noqa: E402
from tests.support import Client, run_server  # noqa: E402

CODE = "print(1)"
BODY = {"mode": "query", "code": CODE, "runId": None}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def start(sandbox: str) -> Kernel:
    workdir = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    return await launch("kb-python", Confinement(workdir=workdir, ipc_dir=workdir),
                        Sandbox(sandbox), spec_manager(), 60)  # type: ignore[arg-type]


async def raw_once(kernel: Kernel) -> float:
    """One execute → execute_reply and idle, straight through jupyter_client."""
    kc = kernel.client
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
    return time.perf_counter() - t0


def rest_once(client: Client) -> float:
    t0 = time.perf_counter()
    r = client.post("/session/bench", json=BODY)
    elapsed = time.perf_counter() - t0
    assert r.json()["result"]["status"] == "finished", r.text
    return elapsed


class LeanClient:
    """The same POST over one keep-alive ``http.client`` connection."""

    def __init__(self, url: str, secret: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {"X-API-Key": secret, "Content-Type": "application/json"}
        self.body = json.dumps(BODY).encode()

    def once(self) -> float:
        t0 = time.perf_counter()
        self.conn.request("POST", "/session/bench", self.body, self.headers)
        answer = self.conn.getresponse().read()
        elapsed = time.perf_counter() - t0
        assert json.loads(answer)["result"]["status"] == "finished", answer
        return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    loop = asyncio.new_event_loop()
    plain = loop.run_until_complete(start("off"))
    boxed = loop.run_until_complete(start("auto"))
    samples: dict[str, list[float]] = {"raw, unsandboxed": [], "raw, sandboxed": [],
                                       "kernel-bridge REST": [], "REST, http.client": []}
    try:
        with run_server() as server, server.client() as client:
            # requests re-reads proxy settings from os.environ on every call (~0.5 ms here);
            # that is the benchmark client's cost, not the server's.
            client.trust_env = False
            r = client.post("/session", json={"lang": "python", "name": "bench"})
            assert r.status_code == 201, r.text
            lean = LeanClient(server.url, server.secret_key)
            for i in range(args.warmup + args.n):
                got: list[Any] = [loop.run_until_complete(raw_once(plain)),
                                  loop.run_until_complete(raw_once(boxed)), rest_once(client),
                                  lean.once()]
                if i >= args.warmup:
                    for key, value in zip(samples, got, strict=True):
                        samples[key].append(value)
    finally:
        loop.run_until_complete(plain.shutdown())
        loop.run_until_complete(boxed.shutdown())
        loop.close()
    print(f"print(1) round trip, n={args.n} each, kb-python (ipykernel), sampled in turn")
    print(f"{'path':<22} {'median ms':>10} {'p99 ms':>10}")
    for name, s in samples.items():
        print(f"{name:<22} {statistics.median(s) * 1000:>10.2f} {pct(s, 0.99) * 1000:>10.2f}")
    for rest in ("kernel-bridge REST", "REST, http.client"):
        api = samples[rest]
        for name in ("raw, unsandboxed", "raw, sandboxed"):
            base = samples[name]
            print(f"{rest} / {name}: median "
                  f"{statistics.median(api) / statistics.median(base):.2f}x (target <= 1.3x), "
                  f"p99 {pct(api, 0.99) / pct(base, 0.99):.2f}x")


if __name__ == "__main__":
    main()
