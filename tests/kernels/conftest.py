"""Fixtures for driving kernel-bridge's kernels as real Jupyter kernels.

Every kernelspec under ``kernelspecs/specs`` is installed into a temporary
``JUPYTER_PATH`` with argv[0] replaced by this interpreter, the way the server
and ``kernel-bridge kernelspecs install`` do it; jupyter_client then finds
them by name (``start_new_kernel("kb-bash")``), jupyter_kernel_test included.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from jupyter_client.provisioning import KernelProvisionerFactory

from kernelspecs import spec_dirs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def installed_kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("jupyter")
    for name, src in spec_dirs().items():
        spec = json.loads((src / "kernel.json").read_text())
        spec["argv"][0] = sys.executable
        # Started here as any Jupyter would, by its local provisioner (the kb-sandbox
        # provisioner serves kernel-bridge only), as `kernel-bridge kernelspecs install` does.
        spec["metadata"].pop("kernel_provisioner", None)
        (root / "kernels" / name).mkdir(parents=True)
        (root / "kernels" / name / "kernel.json").write_text(json.dumps(spec))
    saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", "PYTHONPATH")}
    # The server's launch makes kb-sandbox the process-wide default provisioner (a singleton);
    # a unit test that ran it earlier in this process must not decide how these kernels start.
    factory = KernelProvisionerFactory.instance()
    default = factory.default_provisioner_name
    factory.default_provisioner_name = "local-provisioner"
    os.environ["JUPYTER_PATH"] = str(root)
    # Kernels run `python -m kernelspecs.…` from a checkout, not an install.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    yield root
    factory.default_provisioner_name = default
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass
class CellRun:
    """What one execute_request produced, in arrival order."""

    reply: dict[str, Any]
    streams: list[tuple[str, str]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    input_requests: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    results: list[str] = field(default_factory=list)  # execute_results' text/plain
    arrivals: list[float] = field(default_factory=list)  # seconds into the run, one a stream

    def text(self, name: str) -> str:
        return "".join(text for stream, text in self.streams if stream == name)

    @property
    def exit_code(self) -> int:
        code = self.reply["exit_code"]
        assert isinstance(code, int)
        return code


class KernelDriver:
    """A started kernel plus a blocking client, with a cell runner."""

    def __init__(self, km: KernelManager, kc: BlockingKernelClient) -> None:
        self.km = km
        self.kc = kc

    def reply_to(self, msg_id: str, timeout: float) -> dict[str, Any]:
        """The shell reply to ``msg_id``, past stale kernel_info replies.

        ``start_new_kernel`` waits for the kernel by sending kernel_info requests, and sends
        another whenever a reply takes over a second (or the iopub message after it over
        0.2 s): on a loaded machine one or two of those replies arrive after it has returned.
        Any other reply in the way is a real mismatch and fails.
        """
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.1))
            stale = reply["msg_type"] == "kernel_info_reply"
            if not stale or reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["parent_header"]["msg_id"] == msg_id, (reply["msg_type"], reply["content"])
        return reply

    def run(
        self,
        code: str,
        *,
        answers: list[str] | None = None,
        interrupt_after: float | None = None,
        timeout: float = 60.0,
    ) -> CellRun:
        """Execute ``code``; answer input_requests from ``answers`` (None: no stdin)."""
        started = time.monotonic()
        deadline = started + timeout
        msg_id = self.kc.execute(code, allow_stdin=answers is not None, stop_on_error=False)
        if interrupt_after is not None:
            timer = threading.Timer(interrupt_after, self.km.interrupt_kernel)
            timer.start()
        pending = list(answers or [])
        cell = CellRun(reply={})
        while time.monotonic() < deadline:
            if answers is not None:
                try:
                    request = self.kc.get_stdin_msg(timeout=0.005)
                except queue.Empty:
                    pass
                else:
                    cell.input_requests.append(request["content"])
                    self.kc.input(pending.pop(0) if pending else "\x04")
            try:
                msg = self.kc.get_iopub_msg(timeout=0.005)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                cell.streams.append((content["name"], content["text"]))
                cell.arrivals.append(time.monotonic() - started)
            elif kind == "execute_result":
                cell.results.append(content["data"]["text/plain"])
            elif kind == "error":
                cell.errors.append(content)
            elif kind == "status" and content["execution_state"] == "idle":
                break
        else:
            raise TimeoutError(f"cell did not finish within {timeout}s: {code!r}")
        reply = self.reply_to(msg_id, max(deadline - time.monotonic(), 1.0))
        # Say so plainly rather than hand back a cell without output.
        assert reply["content"]["status"] != "aborted", f"the kernel aborted {code!r}"
        cell.reply, cell.seconds = reply["content"], time.monotonic() - started
        return cell


class KernelPool:
    """Kernels started on first use, one per spec name, each in its own cwd."""

    def __init__(self, workdir: Callable[[str], Path]) -> None:
        self._workdir = workdir
        self._drivers: dict[str, KernelDriver] = {}

    def __getitem__(self, name: str) -> KernelDriver:
        if name not in self._drivers:
            km, kc = start_new_kernel(kernel_name=name, cwd=str(self._workdir(name)))
            self._drivers[name] = KernelDriver(km, kc)
        return self._drivers[name]

    def shutdown(self) -> None:
        for driver in self._drivers.values():
            driver.kc.stop_channels()
            driver.km.shutdown_kernel(now=True)


@pytest.fixture
def start_kernel(tmp_path: Path) -> Iterator[Callable[[str], KernelDriver]]:
    """Start a fresh kernel by spec name in ``tmp_path``; shut down afterwards."""
    pool = KernelPool(lambda _: tmp_path)
    yield pool.__getitem__
    pool.shutdown()


@pytest.fixture(scope="module")
def kernel_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelPool]:
    """Kernels shared by a module's tests: starting one costs about a second."""
    pool = KernelPool(tmp_path_factory.mktemp)
    yield pool
    pool.shutdown()
