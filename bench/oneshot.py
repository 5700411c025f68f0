"""One-shot latency and throughput of the Sandbox execute API, against a cold jupyter_client start.

    python bench/oneshot.py [--samples 30] [--cold 7] [--clients 8] [--total 64]

In one run on one machine, with the same kernel (kb-python, ipykernel):

* warm: ``POST /api/v1/execute {"code": "print(1)"}`` against a real server, one at a time, paced
  so the warm pool has refilled (a fresh sandboxed kernel per execution, destroyed after);
* cold: what a client without a pool pays: jupyter_client ``AsyncKernelManager.start_kernel`` +
  ``wait_for_ready`` + execute ``print(1)`` (no sandbox, no HTTP; shutdown not counted);
* throughput: ``--total`` one-shot executions from ``--clients`` concurrent clients, every one on
  a fresh kernel, so this is bound by how fast the machine starts kernels; with the server
  process's CPU per execution over those (its own, and that of the processes it ran and reaped),
  which, unlike the rate, does not depend on what else loads the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from bridge.kernels import spec_manager  # noqa: E402
from tests.support import Client, run_server  # noqa: E402

BODY = {"code": "print(1)", "language": "python"}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def one_shot(client: Client) -> float:
    t = time.perf_counter()
    r = client.post("/api/v1/execute", json=BODY)
    elapsed = time.perf_counter() - t
    body = r.json()
    if r.status_code != 200 or body["stdout"] != "1\n":
        raise RuntimeError(f"bad answer: {r.status_code} {body}")
    return elapsed


def cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(the process's own CPU, the CPU of its reaped children) in seconds."""
    t = proc.cpu_times()
    return t.user + t.system, t.children_user + t.children_system


def stock_manager() -> AsyncKernelManager:
    """kb-python as stock jupyter_client starts it: its local provisioner, no sandbox."""
    km = AsyncKernelManager(kernel_name="kb-python", kernel_spec_manager=spec_manager())
    assert km.kernel_spec is not None
    km.kernel_spec.metadata["kernel_provisioner"] = {"provisioner_name": "local-provisioner"}
    return km


async def cold_once() -> float:
    t = time.perf_counter()
    km = stock_manager()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    msg_id = kc.execute("print(1)")
    out = ""
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    elapsed = time.perf_counter() - t
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    if out != "1\n":
        raise RuntimeError(f"cold kernel printed {out!r}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--pace", type=float, default=1.5, help="seconds between warm samples")
    ap.add_argument("--cold", type=int, default=7)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--total", type=int, default=64)
    ap.add_argument("--pool", type=int, default=2)
    args = ap.parse_args()

    with run_server(pool_python=str(args.pool), rate_limit="100000") as server, \
            server.client() as client:
        time.sleep(5)  # let the pool fill
        one_shot(client)  # first request: connection set-up
        warm = []
        for _ in range(args.samples):
            time.sleep(args.pace)
            warm.append(one_shot(client))
        time.sleep(5)
        clients = [server.client() for _ in range(args.clients)]
        loaded: list[float] = []
        proc = psutil.Process(server.process.pid)
        cpu0 = cpu_seconds(proc)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as ex:
            loaded = list(ex.map(lambda i: one_shot(clients[i % args.clients]),
                                 range(args.total)))
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds(proc)
        for c in clients:
            c.close()
    cold = [asyncio.run(cold_once()) for _ in range(args.cold)]

    ms = 1000.0
    rows = [
        ("one-shot print(1), warm pool", statistics.median(warm) * ms, pct(warm, 99) * ms,
         len(warm)),
        ("cold jupyter_client start + execute", statistics.median(cold) * ms,
         pct(cold, 99) * ms, len(cold)),
        (f"one-shot under {args.clients} clients", statistics.median(loaded) * ms,
         pct(loaded, 99) * ms, len(loaded)),
    ]
    print(f"\n{'':40} {'median ms':>10} {'p99 ms':>10} {'n':>4}")
    for name, med, p99, n in rows:
        print(f"{name:40} {med:10.1f} {p99:10.1f} {n:4d}")
    ratio = statistics.median(cold) / statistics.median(warm)
    print(f"\ncold / warm median ratio: {ratio:.1f}x (target >= 20x)")
    print(f"throughput: {args.total / wall:.2f} one-shot executions/s with {args.clients} "
          f"concurrent clients ({args.total} in {wall:.1f} s, each on a fresh kernel)")
    own, reaped = ((b - a) / args.total * ms for a, b in zip(cpu0, cpu1, strict=True))
    print(f"server CPU per one-shot under that load: {own:.1f} ms in the server process, "
          f"{reaped:.1f} ms in processes it ran (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
