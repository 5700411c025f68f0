"""The operator's Python environment for kernels (KB_PYTHON_ENV) and the Jupyter dialect's own
concurrency (KB_JUPYTER_CONCURRENCY), issue 12."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.settings import Settings

from .jupyter_support import KernelSocket
from .support import ROOT, Server, run_server

DATASCIENCE_ENV = ROOT / ".venv-datascience"


def test_python_env_must_be_an_environment_with_ipykernel(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no bin/python"):
        Settings(python_env=tmp_path / "nowhere")
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    with pytest.raises(ValidationError, match="has no ipykernel; install it with"):
        Settings(python_env=bare)
    assert Settings().python_interpreter is None


def test_jupyter_kernels_have_their_own_ceiling() -> None:
    s = Settings(jupyter_concurrency=16)
    assert s.concurrency_for("jupyter", 5) == 16
    assert s.concurrency_for("jupyter", 40) == 40  # a key allowed more keeps it
    assert s.concurrency_for("backendai", 5) == 5
    assert s.concurrency_for("sandbox", 5) == 5


@pytest.fixture(scope="module")
def ds_server() -> Iterator[Server]:
    assert (DATASCIENCE_ENV / "bin" / "python").exists(), \
        "the data-science environment is missing: run `make datascience-env`"
    with run_server(python_env=str(DATASCIENCE_ENV), default_concurrency="1",
                    jupyter_concurrency="3") as server:
        yield server


def test_python_kernels_run_in_the_operator_environment(ds_server: Server) -> None:
    env_python = str(DATASCIENCE_ENV / "bin" / "python")
    with ds_server.client() as c:
        # Every dialect's Python runs there: here a Sandbox one-shot.
        r = c.post("/api/v1/execute", json={
            "language": "python", "code": "import sys, numpy\nprint(sys.executable)"})
        assert r.status_code == 200, r.text
        assert r.json()["stdout"] == env_python + "\n", r.json()
        ids = []
        try:
            # Jupyter kernels: three for a keypair whose own concurrency is one.
            for _ in range(3):
                r = c.post("/api/kernels", json={"name": "python3"})
                # The one-shot's place is freed once its kernel is gone, a moment after its
                # answer (admission): a create may find it still held.
                deadline = time.monotonic() + 15
                while r.status_code == 403 and "(execution:" in r.text \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                    r = c.post("/api/kernels", json={"name": "python3"})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            r = c.post("/api/kernels", json={"name": "python3"})
            assert r.status_code == 403, r.text
            assert "at most 3" in r.json()["message"]
            sock = KernelSocket(ds_server.url, ids[0], ds_server.secret_key)
            try:
                out, reply = sock.run(
                    "import sys, pandas as pd\nprint(sys.executable)\n"
                    "print(pd.DataFrame({'a': [1, 2]})['a'].sum())")
                assert reply["content"]["status"] == "ok"
                assert out == f"{env_python}\n3\n"
                # A shell escape finds the same environment first on PATH.
                out, reply = sock.run("!python -c 'import sys, numpy; print(sys.prefix)'")
                assert out.strip() == str(DATASCIENCE_ENV), (out, reply["content"])
                # Bound read-only: a notebook cannot change the environment under others.
                out, reply = sock.run(f"open({str(DATASCIENCE_ENV / 'x')!r}, 'w')")
                assert reply["content"]["status"] == "error"
                assert "Read-only file system" in reply["content"]["evalue"]
            finally:
                sock.close()
            # Our own kernels keep the server's interpreter.
            assert c.delete(f"/api/kernels/{ids.pop()}").status_code == 204
            r = c.post("/api/kernels", json={"name": "kb-bash"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            sock = KernelSocket(ds_server.url, ids[-1], ds_server.secret_key)
            try:
                assert sock.run("echo hello")[0] == "hello\n"
            finally:
                sock.close()
        finally:
            for kid in ids:
                c.delete(f"/api/kernels/{kid}")
