"""Fresh kernels from the zygote against cold starts, in one run on one machine (issue 14).

    python bench/kernel_start.py [--kernels 40] [--cold 6] [--concurrency 4] [--idle 100]
                                 [--paced-s 60] [--clients 8] [--total 80]

Prints, each with the baseline measured in the same run:

* **starts/s**: fresh sandboxed kb-python kernels (launch → ``kernel_info`` answered) through
  the one launch function with the zygote, against the same launch without it and against
  stock ``AsyncKernelManager.start_kernel`` + ``wait_for_ready`` of the same kernelspec
  (unsandboxed), ``--concurrency`` starts in flight on the machine's cores;
* **memory**: unique memory (smaps_rollup Private_Clean + Private_Dirty) per idle kernel after
  one execution, forked against cold; and the total PSS of ``--idle`` idle forked kernels with
  their sandboxes and the zygote;
* **one-shot** through a real server (Sandbox ``POST /api/v1/execute``, a fresh kernel each):
  throughput from ``--clients`` concurrent clients, and the median with one execution every
  0.2 s for ``--paced-s`` seconds, against a cold jupyter_client start + execute.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from bench.oneshot import cold_once, one_shot, stock_manager  # noqa: E402
from bridge.kernels import Kernel, launch, spec_manager  # noqa: E402
from bridge.pool import warm_up  # noqa: E402
from bridge.sandbox import Confinement, Sandbox, base_environ  # noqa: E402
from bridge.zygote import KEEPER, Zygotes, private_bytes  # noqa: E402
from tests.support import run_server  # noqa: E402

MIB = 1024 * 1024
MEM_CAP = 1 << 30


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


async def start_many(n: int, concurrency: int, sandbox: Sandbox, keeper: Zygotes,
                     zygotes: Zygotes | None) -> tuple[float, list[Kernel], float]:
    """Start ``n`` kernels, ``concurrency`` at a time, forked by ``zygotes`` or (None) spawned
    cold by ``keeper`` → (starts per second, the kernels, CPU seconds per start: this process,
    each kernel's process tree with its sandbox, the zygote).
    """
    lines = {KEEPER: keeper, **({} if zygotes is None else {zygotes.python: zygotes})}
    ksm = spec_manager()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Kernel:
        async with gate:
            wd = Path(tempfile.mkdtemp(prefix="kb-bench-"))
            return await launch("kb-python", Confinement(workdir=wd, ipc_dir=wd,
                                                         mem_bytes=MEM_CAP),
                                sandbox, ksm, 120, zygotes=lines)

    z = zygotes.current.pid if zygotes is not None and zygotes.current is not None else 0
    k = keeper.current.pid if keeper.current is not None else 0
    t0, c0, z0 = time.perf_counter(), own_cpu(), tree_cpu(z) if z else 0.0
    k0 = tree_cpu(k) if z and k else 0.0
    kernels = list(await asyncio.gather(*(one() for _ in range(n))))
    rate = n / (time.perf_counter() - t0)
    # A forked kernel is the zygote's child, its sandbox the keeper's: counted in their trees.
    trees = (tree_cpu(z) - z0 + (tree_cpu(k) - k0 if k else 0.0)) if z else sum(
        tree_cpu(kern.manager.provisioner.pid) for kern in kernels)  # type: ignore[union-attr]
    return rate, kernels, (own_cpu() - c0 + trees) / n


def tree_cpu(pid: int) -> float:
    """CPU seconds of a live process and its descendants."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


async def stock_starts(n: int, concurrency: int) -> tuple[float, float]:
    """AsyncKernelManager.start_kernel + wait_for_ready of kb-python, no sandbox, no zygote
    → (starts per second, CPU seconds per start)."""
    gate = asyncio.Semaphore(concurrency)
    managers: list[AsyncKernelManager] = []

    async def one() -> None:
        async with gate:
            km = stock_manager()
            await km.start_kernel()
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=120)
            kc.stop_channels()
            managers.append(km)

    t0, c0 = time.perf_counter(), own_cpu()
    await asyncio.gather(*(one() for _ in range(n)))
    rate = n / (time.perf_counter() - t0)
    cpu = own_cpu() - c0 + sum(tree_cpu(km.provisioner.pid) for km in managers  # type: ignore
                               if km.provisioner is not None)
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))
    return rate, cpu / n


def kernel_pid(k: Kernel) -> int:
    """The kernel's Python process: the provisioner's pid, or (cold) the one inside bwrap."""
    proc = psutil.Process(k.manager.provisioner.pid)  # type: ignore[union-attr]
    for p in [proc, *proc.children(recursive=True)]:
        if p.name() != "bwrap" and "ipykernel_launcher" in " ".join(p.cmdline()):
            return p.pid
    return proc.pid


def kernel_tree(k: Kernel) -> list[psutil.Process]:
    pid = k.manager.provisioner.pid  # type: ignore[union-attr]
    procs = [psutil.Process(pid)]
    nest = getattr(k.manager.provisioner, "nest", None)
    if nest is not None:
        h = psutil.Process(nest.pid)
        procs += [h, *h.children(recursive=True)]
    return procs


async def memory(kernels: list[Kernel]) -> tuple[float, float]:
    """(median unique MiB per kernel, total PSS MiB of the kernels with their sandboxes)."""
    await asyncio.gather(*(warm_up(k, "x = 1\nprint(x)") for k in kernels),
                         return_exceptions=True)
    await asyncio.sleep(1)
    unique = [private_bytes(kernel_pid(k)) / MIB for k in kernels]
    pss = sum(pss_bytes(p.pid) for k in kernels for p in kernel_tree(k)) / MIB
    return statistics.median(unique), pss


async def starts_and_memory(args: argparse.Namespace) -> dict[str, float]:
    sandbox = Sandbox("auto", pids=256)
    keeper = Zygotes(base_environ({}, sandbox.tool_path), 0, plain=True)
    keeper.start()
    zygotes = Zygotes(base_environ({}, sandbox.tool_path), 10_000)
    zygotes.start()
    assert zygotes.current is not None
    await zygotes.current.ready
    out: dict[str, float] = {}
    await start_many(4, args.concurrency, sandbox, keeper, zygotes)  # warm the caches
    out["zygote_rate"], kernels, out["zygote_cpu"] = await start_many(
        args.kernels, args.concurrency, sandbox, keeper, zygotes)
    print(f"  zygote: {out['zygote_rate']:.1f}/s", flush=True)
    out["zygote_unique"], _ = await memory(kernels[:20])
    await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)
    out["cold_rate"], cold, out["cold_cpu"] = await start_many(args.cold, args.concurrency,
                                                               sandbox, keeper, None)
    print(f"  cold: {out['cold_rate']:.1f}/s", flush=True)
    out["cold_unique"], _ = await memory(cold)
    await asyncio.gather(*(k.shutdown() for k in cold), return_exceptions=True)
    out["stock_rate"], out["stock_cpu"] = await stock_starts(args.cold, args.concurrency)
    print(f"  stock: {out['stock_rate']:.1f}/s", flush=True)

    idle: list[Kernel] = []
    for _ in range(0, args.idle, 10):  # in tens: a start that fails does not lose the others
        _, more, _ = await start_many(min(10, args.idle - len(idle)), args.concurrency,
                                      sandbox, keeper, zygotes)
        idle += more
    _, pss = await memory(idle)
    assert zygotes.current is not None
    out["idle_total"] = pss + pss_bytes(zygotes.current.pid) / MIB
    await asyncio.gather(*(k.shutdown() for k in idle), return_exceptions=True)
    await zygotes.close()
    await keeper.close()
    return out


def one_shots(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with run_server(pool_python=str(args.pool), rate_limit="1000000") as server, \
            server.client() as client:
        client.trust_env = False
        time.sleep(3)
        one_shot(client)
        clients = [server.client() for _ in range(args.clients)]
        for c in clients:
            c.trust_env = False
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as ex:
            list(ex.map(lambda i: one_shot(clients[i % args.clients]), range(args.total)))
        out["throughput"] = args.total / (time.perf_counter() - t0)
        for c in clients:
            c.close()
        time.sleep(2)
        paced: list[float] = []
        end = time.perf_counter() + args.paced_s
        next_at = time.perf_counter()
        while time.perf_counter() < end:
            next_at += 0.2
            paced.append(one_shot(client))
            time.sleep(max(0.0, next_at - time.perf_counter()))
        out["paced_median"] = statistics.median(paced) * 1000
        out["paced_p90"] = sorted(paced)[int(0.9 * (len(paced) - 1))] * 1000
    cold = [asyncio.run(cold_once()) for _ in range(args.cold)]
    out["cold_median"] = statistics.median(cold) * 1000
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=40)
    ap.add_argument("--cold", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--paced-s", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--total", type=int, default=80)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args()

    s = asyncio.run(starts_and_memory(args))
    print(f"\nfresh sandboxed kb-python kernels, {args.concurrency} starts in flight, "
          f"{psutil.cpu_count()} cores (load average {psutil.getloadavg()[0]:.1f})")
    print(f"  zygote:                              {s['zygote_rate']:6.1f} starts/s "
          f"(n={args.kernels})")
    print(f"  same launch, cold (no zygote):       {s['cold_rate']:6.1f} starts/s "
          f"-> {s['zygote_rate'] / s['cold_rate']:.1f}x")
    print(f"  AsyncKernelManager.start_kernel:     {s['stock_rate']:6.1f} starts/s "
          f"(unsandboxed) -> {s['zygote_rate'] / s['stock_rate']:.1f}x (target >= 10x)")
    print("CPU per start (server side, kernel, sandbox, zygote; independent of other load):")
    print(f"  zygote {s['zygote_cpu'] * 1000:.0f} ms, cold {s['cold_cpu'] * 1000:.0f} ms "
          f"-> {s['cold_cpu'] / s['zygote_cpu']:.1f}x, stock AsyncKernelManager "
          f"{s['stock_cpu'] * 1000:.0f} ms -> {s['stock_cpu'] / s['zygote_cpu']:.1f}x; "
          f"{psutil.cpu_count()} idle cores would start {psutil.cpu_count() / s['zygote_cpu']:.0f} "
          f"forked kernels/s")
    print("unique memory (smaps Private) per idle kernel after one execution:")
    print(f"  zygote: {s['zygote_unique']:.1f} MiB   cold: {s['cold_unique']:.1f} MiB "
          f"(target <= 15 MB)")
    print(f"{args.idle} idle forked kernels with their sandboxes and the zygote: "
          f"{s['idle_total']:.0f} MiB PSS in total (target <= 2 GB)")
    if args.skip_server:
        return 0
    o = one_shots(args)
    print(f"one-shot print(1) through the server, a fresh kernel each (pool {args.pool}):")
    print(f"  {args.clients} concurrent clients: {o['throughput']:.1f} executions/s "
          f"(target >= 20/s)")
    print(f"  one every 0.2 s for {args.paced_s:.0f} s: median {o['paced_median']:.1f} ms, "
          f"p90 {o['paced_p90']:.1f} ms (target <= 40 ms)")
    print(f"  cold jupyter_client start + execute: median {o['cold_median']:.1f} ms "
          f"-> {o['cold_median'] / o['paced_median']:.1f}x (target >= 15x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
