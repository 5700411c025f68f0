"""The kernel's own share of a forked start, without the server or the sandbox (issue 14).

    python bench/kernel_child.py [--kernels 20] [--spec kb-python]

Starts the real zygote (``python -m kernelspecs._zygote``), asks it for ``--kernels`` unsandboxed
forks of the kernelspec's command, one at a time, and prints for each kind of figure the median
over the kernels:

* **CPU to ready**: the forked kernel's own CPU (all its threads, user + system) from the fork
  until it has answered ``kernel_info`` — what ``initialize()`` and ``start()`` cost in a child of
  the warmed template;
* **unique memory**: smaps_rollup Private_Clean + Private_Dirty of the idle kernel after one
  execution (``x = 1; print(x)``), a second later;
* the zygote's warm-up time and module count, once.

No sandbox, cgroup or server: ``bench/kernel_start.py`` measures the whole start.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jupyter_client.blocking import BlockingKernelClient  # noqa: E402
from jupyter_client.connect import write_connection_file  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

from bridge.zygote import private_bytes  # noqa: E402

MIB = 1024 * 1024


class Template:
    """The real zygote on a control socket; forks unsandboxed kernels."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernelspecs._zygote", "--control", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], cwd=ROOT, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
                 "OPENBLAS_NUM_THREADS": "1"})
        theirs.close()
        self.ready = self.recv()
        self.ids = 0

    def recv(self) -> dict[str, Any]:
        while True:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 4)
            for fd in fds:
                os.close(fd)
            msg: dict[str, Any] = json.loads(data)
            if "exit" not in msg and "log" not in msg:
                return msg
            if "log" in msg:
                print("  kernel:", msg["line"], file=sys.stderr)

    def fork(self, argv: list[str], env: dict[str, str], cwd: str) -> int:
        fields = ["0", "0", cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
        payload = os.memfd_create("kb-kernel")
        os.write(payload, "\0".join(fields).encode())
        os.lseek(payload, 0, os.SEEK_SET)
        self.ids += 1
        req = {"op": "fork", "id": self.ids, "module": argv[2], "sandboxed": False, "cwd": cwd,
               "zygote_pythonpath": [str(ROOT)], "kernel_package": str(ROOT / "kernelspecs"),
               "fds": ["payload"], "log": "bench"}
        socket.send_fds(self.sock, [json.dumps(req).encode()], [payload])
        os.close(payload)
        reply = self.recv()
        if "pid" not in reply:
            raise RuntimeError(reply)
        return int(reply["pid"])

    def close(self) -> None:
        socket.send_fds(self.sock, [json.dumps({"op": "stop"}).encode()], [])
        self.proc.wait(10)


def cpu(pid: int) -> float:
    """CPU seconds of a live process, all its threads (schedstat: nanoseconds, not ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def one(template: Template, spec_argv: list[str]) -> tuple[float, float, int, BlockingKernelClient]:
    wd = tempfile.mkdtemp(prefix="kb-child-")
    conn = os.path.join(wd, "kernel.json")
    write_connection_file(conn, transport="ipc", ip=os.path.join(wd, "k"))
    argv = [sys.executable, *(a.replace("{connection_file}", conn) for a in spec_argv[1:])]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": wd, "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    pid = template.fork(argv, env, wd)
    kc = BlockingKernelClient(connection_file=conn)
    kc.load_connection_file()
    kc.start_channels(hb=False)  # a heartbeat late under load is no death: its pid says
    kc.wait_for_ready(timeout=60)
    os.kill(pid, 0)
    ready = cpu(pid)
    kc.execute_interactive("x = 1\nprint(x)", timeout=60, output_hook=lambda msg: None)
    time.sleep(1)
    return ready, private_bytes(pid) / MIB, pid, kc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=20)
    ap.add_argument("--spec", default="kb-python")
    args = ap.parse_args()
    spec = KernelSpecManager().get_kernel_spec(args.spec)
    template = Template()
    print(f"zygote: {template.ready.get('modules')} modules, warm-up "
          f"{template.ready.get('warm_up_s')} s")
    cpus, mems, clients = [], [], []
    try:
        for _ in range(args.kernels):
            c, m, _pid, kc = one(template, spec.argv)
            cpus.append(c * 1000)
            mems.append(m)
            clients.append(kc)
    finally:
        for kc in clients:
            kc.stop_channels()
        template.close()
    print(f"{args.spec}, {args.kernels} forked kernels (no sandbox): CPU to ready median "
          f"{statistics.median(cpus):.0f} ms (min {min(cpus):.0f}, max {max(cpus):.0f}); "
          f"unique memory after one execution median {statistics.median(mems):.1f} MiB "
          f"(min {min(mems):.1f}, max {max(mems):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
