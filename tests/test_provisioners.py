"""The provisioner seam (issue 13): kernels start through the provisioner their kernelspec names.

* An operator's kernelspec naming another provisioner (here ``kb-test-recording``, a package in
  tests/provisioners registered by its dist-info's entry_points.txt, found on the server's
  PYTHONPATH as an installed one would be), installed where Jupyter looks (JUPYTER_PATH), is
  offered by the Jupyter dialect under its name and started through that provisioner,
  unchanged: it writes down the launch, and the user sees the kernel's output.
* A kernelspec naming no provisioner (ipykernel's python3 as Jupyter finds it) is started by
  ours, confined: never by jupyter_client's unconfined local provisioner.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from bridge.kernels import launch
from bridge.provisioner import SandboxProvisioner
from bridge.sandbox import Confinement, Sandbox

from .jupyter_support import KernelSocket
from .support import ROOT, Server, run_server

PROVISIONERS = ROOT / "tests" / "provisioners"


@pytest.fixture(scope="module")
def operator_spec() -> Iterator[tuple[Path, Path]]:
    """A JUPYTER_PATH with a kernelspec ``recorded-python`` naming the test provisioner,
    configured (from the kernelspec) to record launches in a file → (jupyter path, record)."""
    with tempfile.TemporaryDirectory(prefix="kb-jupyter-") as tmp:
        root = Path(tmp)
        record = root / "launches.jsonl"
        spec_dir = root / "kernels" / "recorded-python"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (recorded)", "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": "kb-test-recording",
                                                "config": {"record_to": str(record)}}}}))
        yield root, record


@pytest.fixture(scope="module")
def server(operator_spec: tuple[Path, Path]) -> Iterator[Server]:
    jupyter_path, _ = operator_spec
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PYTHONPATH")}
    os.environ["JUPYTER_PATH"] = str(jupyter_path)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROVISIONERS), saved["PYTHONPATH"]]))
    try:
        with run_server(pool_python="0") as s:
            yield s
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_an_operator_spec_starts_through_the_provisioner_it_names(
        server: Server, operator_spec: tuple[Path, Path]) -> None:
    _, record = operator_spec
    with server.client() as client:
        specs = client.get("/api/kernelspecs").json()["kernelspecs"]
        assert "recorded-python" in specs
        r = client.post("/api/kernels", json={"name": "recorded-python"})
        assert r.status_code == 201, r.text
        kid = r.json()["id"]
        try:
            launches = [json.loads(line) for line in record.read_text().splitlines()]
            assert len(launches) == 1, launches
            assert launches[0]["cmd"][1:3] == ["-m", "ipykernel_launcher"]
            pid = launches[0]["pid"]
            # The provisioner's kernel, unchanged: its own process, not in our sandbox.
            assert psutil.Process(pid).name() != "bwrap"
            sock = KernelSocket(server.url, kid, server.secret_key)
            try:
                out, reply = sock.run("import os\nprint('hello from', os.getpid())")
            finally:
                sock.close()
            assert reply["content"]["status"] == "ok"
            assert out == f"hello from {pid}\n"
        finally:
            assert client.delete(f"/api/kernels/{kid}").status_code == 204
    assert "its confinement is that provisioner's" in server.log()


def test_a_spec_naming_no_provisioner_is_confined_by_ours(tmp_path: Path) -> None:
    """ipykernel's own python3 spec, as Jupyter would find it: started by kb-sandbox."""
    spec_dir = tmp_path / "kernels" / "plain-python"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])

    async def scenario() -> None:
        work = Path(tempfile.mkdtemp(prefix="kb-plain-"))
        kernel = await launch("plain-python", Confinement(workdir=work, ipc_dir=work,
                                                          mem_bytes=1 << 30),
                              Sandbox("on"), ksm, 60)
        try:
            assert isinstance(kernel.manager.provisioner, SandboxProvisioner)
            proc = psutil.Process(kernel.manager.provisioner.pid)
            assert proc.name() == "bwrap"
            kernels = [p for p in proc.children(recursive=True)
                       if "ipykernel_launcher" in " ".join(p.cmdline())]
            assert kernels and all(p.uids().real != 0 for p in kernels)
        finally:
            await kernel.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("fork", [True, False])
def test_the_provisioner_is_configured_from_the_kernelspec(tmp_path: Path, fork: bool) -> None:
    """``"config": {"fork": false}`` keeps a kernel the zygote could fork off it."""
    from bridge.kernels import IPC_ROOT
    from bridge.sandbox import base_environ
    from bridge.zygote import for_interpreters

    shipped = json.loads((ROOT / "kernelspecs" / "specs" / "kb-python" / "kernel.json")
                         .read_text())
    shipped["metadata"]["kernel_provisioner"]["config"] = {"fork": fork}
    (tmp_path / "kernels" / "py").mkdir(parents=True)
    (tmp_path / "kernels" / "py" / "kernel.json").write_text(json.dumps(shipped))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])

    async def scenario() -> None:
        sandbox = Sandbox("on")
        lines = for_interpreters(base_environ({}, sandbox.tool_path), 10, [sys.executable],
                                 sockets_dir=IPC_ROOT)
        for line in lines.values():
            line.start()
        work = Path(tempfile.mkdtemp(prefix="kb-conf-"))
        kernel = await launch("py", Confinement(workdir=work, ipc_dir=work, mem_bytes=1 << 30),
                              sandbox, ksm, 60, zygotes=lines)
        try:
            prov = kernel.manager.provisioner
            assert isinstance(prov, SandboxProvisioner)
            assert prov.fork is fork and prov.from_zygote is fork
        finally:
            await kernel.shutdown()
            await asyncio.gather(*(line.close() for line in lines.values()))

    asyncio.run(scenario())


def test_a_kernel_that_dies_starting_is_reported_not_retried(tmp_path: Path) -> None:
    """Spawned by its keeper and dead before it listens: the start fails with the kernel's
    death (once), not with a second launch on descriptors the first one used up."""
    from bridge.errors import KernelStartFailed
    from bridge.kernels import IPC_ROOT
    from bridge.sandbox import base_environ
    from bridge.zygote import for_interpreters

    (tmp_path / "kernels" / "dies").mkdir(parents=True)
    (tmp_path / "kernels" / "dies" / "kernel.json").write_text(json.dumps({
        "argv": ["python", "-c", "import sys; sys.exit(3)", "{connection_file}"],
        "display_name": "dies", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "kb-sandbox"}}}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])

    async def scenario() -> None:
        sandbox = Sandbox("on")
        lines = for_interpreters(base_environ({}, sandbox.tool_path), 10, [sys.executable],
                                 fork=False, sockets_dir=IPC_ROOT)
        for line in lines.values():
            line.start()
        work = Path(tempfile.mkdtemp(prefix="kb-dies-"))
        try:
            with pytest.raises(KernelStartFailed, match="died"):
                await launch("dies", Confinement(workdir=work, ipc_dir=work), sandbox, ksm, 30,
                             zygotes=lines)
        finally:
            await asyncio.gather(*(line.close() for line in lines.values()))

    asyncio.run(scenario())
