"""Kernels outlive the process that started them, and a later one takes them over (issue 15).

The honest setting: a child process (``python -m tests.test_kernel_adopt``) starts a real,
sandboxed kernel through ``launch()`` with its keepers (a zygote fork, or a cold start by the
plain keeper), sets a variable, prints the kernel's record and is then SIGKILLed, as a server
would be. This process then adopts the kernel from the record alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bridge import ipc
from bridge.errors import KernelGone
from bridge.ipc import set_owner_scope
from bridge.kernels import (
    IPC_ROOT,
    Kernel,
    adopt,
    ipc_root,
    launch,
    spec_manager,
    sweep_ipc,
)
from bridge.sandbox import Confinement, Sandbox, base_environ
from bridge.zygote import Zygotes, for_interpreters

from .support import ROOT

MEM = 1 << 30


def keepers(sandbox: Sandbox, fork: bool) -> dict[str, Zygotes]:
    ipc_root()  # where they listen (a server makes it at start)
    lines = for_interpreters(base_environ({}, sandbox.tool_path), 100, [sys.executable],
                             fork=fork, sockets_dir=IPC_ROOT)
    for line in lines.values():
        line.start()
    return lines


async def run(kernel: Kernel, code: str, timeout: float = 30) -> tuple[str, str]:
    """Execute ``code`` → (stdout, error name or "")."""
    client = kernel.client
    msg_id = client.execute(code)
    out, err = "", ""
    deadline = time.monotonic() + timeout
    while True:
        msg = await client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            out += content["text"]
        elif kind == "error":
            err = content["ename"]
        elif kind == "status" and content["execution_state"] == "idle":
            return out, err


async def _child(fork: bool, scope: str) -> None:
    set_owner_scope(Path(scope))
    sandbox = Sandbox("on")
    lines = keepers(sandbox, fork)
    for line in lines.values():  # a busy machine: a zygote still warming up would mean cold
        assert line.current is not None
        await line.current.ready
    workdir = Path(tempfile.mkdtemp(prefix="kb-adopt-"))
    kernel = await launch("kb-python", Confinement(workdir=workdir, ipc_dir=workdir,
                                                   mem_bytes=MEM),
                          sandbox, spec_manager(), 60, zygotes=lines)
    out, err = await run(kernel, "x = 41\nprint('set')")
    assert out == "set\n", (out, err)
    print(json.dumps(kernel.record()), flush=True)
    await asyncio.sleep(3600)  # until killed, like a server


def started_elsewhere(fork: bool) -> dict[str, Any]:
    """A kernel started by a child process that was then SIGKILLed → its record."""
    PRIVATE_TMP.mkdir(exist_ok=True)
    child = subprocess.Popen([sys.executable, "-m", "tests.test_kernel_adopt",
                              "fork" if fork else "cold", str(SCOPE)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(PRIVATE_TMP)})
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child did not start its kernel"
        record: dict[str, Any] = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    return record


# Like a server's data dir: the IPC root is the machine's, and another server's sweep leaves
# alone what a gone "server" of another data dir left (these kernels, between kill and adopt).
SCOPE = Path(tempfile.gettempdir()) / f"kb-adopt-test-{os.getpid()}"
# The children's IPC root is a private one (TMPDIR): servers of other checkouts on this machine
# sweep the shared one by rules of their own.
PRIVATE_TMP = Path(tempfile.gettempdir()) / f"kb-adopt-{os.getpid()}"
CHILD_ROOT = PRIVATE_TMP / IPC_ROOT.name


@pytest.fixture(autouse=True)
def owner_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc, "_scope", ipc.scope_of(SCOPE))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    yield Sandbox("on")
    shutil.rmtree(PRIVATE_TMP, ignore_errors=True)  # every kernel in it was shut down or swept


@pytest.fixture
def event_loop_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "cold"])
def test_a_kernel_outlives_its_server_and_is_adopted(
        fork: bool, sandbox: Sandbox, event_loop_runner: asyncio.Runner,
        caplog: pytest.LogCaptureFixture) -> None:
    record = started_elsewhere(fork)
    info = record["provisioner"]["info"]
    assert info["forked"] is fork
    kernel_pid = int(info["pid"])
    # The server is gone; the kernel is not, and its parent is its keeper, not init.
    proc = psutil.Process(kernel_pid)
    assert proc.status() != psutil.STATUS_ZOMBIE
    assert "kernelspecs._zygote" in " ".join(proc.parent().cmdline())

    async def scenario() -> None:
        lines = keepers(sandbox, fork)
        try:
            kernel = await adopt(record, sandbox=sandbox, ksm=spec_manager(), timeout=30,
                                 zygotes=lines)
            assert await run(kernel, "print(x + 1)") == ("42\n", "")
            assert kernel.usage().mem_bytes > 0
            # Its stderr (diagnostics, not user output) reaches this process's log through
            # its keeper: the pipe to the server that started it is long gone.
            code = ("import os, sys\nos.write(sys.stderr._original_stdstream_copy, "
                    "b'diagnostic from the kernel\\n')")
            assert await run(kernel, code) == ("", "")
            for _ in range(100):
                if any("diagnostic from the kernel" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            relayed = [r for r in caplog.records if "diagnostic from the kernel" in r.getMessage()]
            assert relayed and relayed[0].name == "kernel_bridge.kernel"
            assert kernel.id in relayed[0].getMessage()
            # Interrupt through the adopted manager.
            looping = asyncio.ensure_future(
                run(kernel, "import time\nprint('looping', flush=True)\nwhile True: "
                            "time.sleep(0.05)"))
            await asyncio.sleep(1)
            await kernel.interrupt()
            assert await looping == ("looping\n", "KeyboardInterrupt")
            assert await run(kernel, "print(x)") == ("41\n", "")
            # A restart starts a fresh kernel through this process's keepers, same cgroup.
            cgroup = kernel.cgroup
            changed: list[Kernel] = []
            kernel.on_record_change.append(changed.append)
            await kernel.restart(60)
            assert changed == [kernel]  # the new process's record is to be persisted again
            assert kernel.cgroup == cgroup
            assert await run(kernel, "print('x' in dir())") == ("False\n", "")
            new_pid = kernel.record()["provisioner"]["info"]["pid"]
            assert new_pid != kernel_pid
            wait_gone(kernel_pid)  # the old process was killed and reaped by its keeper
            await kernel.shutdown()
            assert not Path(record["ipc_dir"]).exists()
            assert not psutil.pid_exists(new_pid)
        finally:
            await asyncio.gather(*(line.close() for line in lines.values()))

    event_loop_runner.run(scenario())


def wait_gone(pid: int, timeout: float = 15) -> None:
    """Until ``pid`` is reaped (a zombie would mean nobody holds the kernel)."""
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid), psutil.Process(pid).status()


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "cold"])
def test_a_kernel_killed_while_no_server_ran_is_gone(
        fork: bool, sandbox: Sandbox, event_loop_runner: asyncio.Runner) -> None:
    record = started_elsewhere(fork)
    pid = int(record["provisioner"]["info"]["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)  # its keeper reaped it: no zombie

    async def scenario() -> None:
        # The keeper tells how it ended; or, having held only this kernel, left with it.
        with pytest.raises(KernelGone, match=r"is gone: it (exited|ended).* while no server "
                                             r"watched it"):
            await adopt(record, sandbox=sandbox, ksm=spec_manager(), timeout=30)

    event_loop_runner.run(scenario())
    assert not Path(record["ipc_dir"]).exists()  # nothing of it left


@pytest.mark.parametrize("by", ["cgroup", "keeper"])
def test_sweep_removes_what_no_kept_kernel_uses(by: str) -> None:
    """Killed through its cgroup, or (no cgroups) through a pidfd its keeper hands out."""
    cgroups = Sandbox("on").cgroups if by == "cgroup" else None
    kept, dropped = started_elsewhere(True), started_elsewhere(False)
    sweep_ipc({Path(kept["ipc_dir"])}, CHILD_ROOT, cgroups)
    assert Path(kept["ipc_dir"]).is_dir()
    assert not Path(dropped["ipc_dir"]).exists()
    wait_gone(int(dropped["provisioner"]["info"]["pid"]))  # killed, and reaped by its keeper
    assert psutil.pid_exists(int(kept["provisioner"]["info"]["pid"]))
    sweep_ipc(set(), CHILD_ROOT, cgroups)
    wait_gone(int(kept["provisioner"]["info"]["pid"]))
    assert not Path(kept["ipc_dir"]).exists()


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1] == "fork", sys.argv[2]))
