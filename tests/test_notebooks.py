"""Notebook execution (issue 7): ``kernel-bridge run`` embedded and against a server, and
``POST /api/v1/notebooks/execute``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat

from .support import ROOT, Client, Server

EXAMPLE = ROOT / "examples" / "report.ipynb"


def notebook(*sources: str, tags: dict[int, list[str]] | None = None) -> dict[str, Any]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    for index, t in (tags or {}).items():
        nb.cells[index].metadata["tags"] = t
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return dict(json.loads(nbformat.writes(nb)))


def kernel_bridge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def stdout_of(cell: dict[str, Any]) -> str:
    return "".join(o.get("text", "") for o in cell["outputs"] if o["output_type"] == "stream")


def test_run_embedded_with_parameters_writes_the_executed_notebook(tmp_path: Path) -> None:
    out = tmp_path / "out.ipynb"
    done = kernel_bridge("run", str(EXAMPLE), "-o", str(out), "-p", "day=3", "-p", "city=Lyon")
    assert done.returncode == 0, done.stderr
    assert "5/5" in done.stderr  # the progress bar counted every cell, the injected one too
    nb = json.loads(out.read_text())
    nbformat.validate(nbformat.from_dict(nb))
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    assert tags[1] == ["parameters"] and tags[2] == ["injected-parameters"]
    assert nb["cells"][2]["source"] == "# Parameters\nday = 3\ncity = 'Lyon'"
    assert stdout_of(nb["cells"][3]) == "Lyon, day 3: 93 visits\n"
    result = nb["cells"][4]["outputs"][0]["data"]["text/plain"]
    assert result == "{'city': 'Lyon', 'day': 3, 'total': 93}"
    # The input notebook is untouched.
    assert "injected-parameters" not in EXAMPLE.read_text()


def test_run_failing_cell_exits_non_zero_with_its_traceback(tmp_path: Path) -> None:
    src = tmp_path / "broken.ipynb"
    src.write_text(json.dumps(notebook("x = 1", "def f():\n    return 1 / 0\nf()",
                                       "print('never')")))
    out = tmp_path / "broken.out.ipynb"
    done = kernel_bridge("run", str(src), "-o", str(out), "--no-progress")
    assert done.returncode == 1
    assert "Cell 1 failed: ZeroDivisionError: division by zero" in done.stderr
    assert "return 1 / 0" in done.stderr and "\x1b[" not in done.stderr
    nb = json.loads(out.read_text())  # written anyway, as far as it got
    assert nb["cells"][1]["outputs"][0]["ename"] == "ZeroDivisionError"
    assert nb["cells"][2]["outputs"] == []


def test_run_against_a_server(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "remote.ipynb"
    # --api-key=…: a secret may begin with "-", which argparse would take for an option.
    done = kernel_bridge("run", str(EXAMPLE), "-o", str(out), "-p", "day=2", "--url",
                         server.url, f"--api-key={server.secret_key}")
    assert done.returncode == 0, done.stderr
    assert "5/5" in done.stderr
    nb = json.loads(out.read_text())
    assert stdout_of(nb["cells"][3]) == "Paris, day 2: 63 visits\n"
    bad = kernel_bridge("run", str(EXAMPLE), "--url", server.url, "--api-key", "wrong",
                        "-o", str(tmp_path / "x.ipynb"))
    assert bad.returncode == 2 and "401" in bad.stderr


def test_execute_api(client: Client) -> None:
    before = client.get("/api/kernels").json()
    nb = notebook("n = 2", "print(n ** 10)", tags={0: ["parameters"]})
    r = client.post("/api/v1/notebooks/execute", json={"notebook": nb, "parameters": {"n": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["error"] is None
    cells = body["notebook"]["cells"]
    assert stdout_of(cells[2]) == "59049\n"
    # The notebook's session ended with the run.
    assert client.get("/api/kernels").json() == before


def test_execute_api_errors_timeout_and_allow_errors(client: Client) -> None:
    nb = notebook("import time\ntime.sleep(30)", "print('after')")
    r = client.post("/api/v1/notebooks/execute", json={"notebook": nb, "timeout": 1})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    assert r.json()["error"]["ename"] == "CellTimeoutError"
    # A fraction of a second is a valid timeout too (nbclient counts whole seconds: found by
    # schemathesis as a 500).
    nb = notebook("import time\ntime.sleep(30)")
    r = client.post("/api/v1/notebooks/execute", json={"notebook": nb, "timeout": 0.25})
    assert r.status_code == 200, r.text
    assert r.json()["error"]["ename"] == "CellTimeoutError"
    nb = notebook("raise ValueError('boom')", "print('after')")
    r = client.post("/api/v1/notebooks/execute", json={"notebook": nb, "allow_errors": True})
    body = r.json()
    assert body["status"] == "completed" and body["errors"] == [0]
    assert stdout_of(body["notebook"]["cells"][1]) == "after\n"


def test_execute_api_bad_input(client: Client) -> None:
    for payload in ({"notebook": {"cells": "nope"}}, {"notebook": notebook("1"), "x": 1},
                    {"notebook": notebook("1"), "parameters": {"not an id": 1}},
                    {"notebook": notebook("1"), "language": "cobol"}):
        r = client.post("/api/v1/notebooks/execute", json=payload)
        assert r.status_code == 400, (payload, r.text)
        assert set(r.json()) == {"message", "reason"}
    r = client.post("/api/v1/notebooks/execute",
                    json={"notebook": notebook("1"), "session_id": "no-such-session"})
    assert r.status_code == 404


def test_execute_api_takes_a_bare_ipynb_with_query_parameters(client: Client,
                                                               tmp_path: Path) -> None:
    """``curl --data-binary @nb.ipynb '…/notebooks/execute?x=40&name=abc'``: the file as it is
    on disk, parameters in the query string, each a Python literal where it parses."""
    nb = notebook("x = 1\nname = 'nobody'\nflags = None", "print(x + 2, name, flags)",
                  tags={0: ["parameters"]})
    raw = json.dumps(nb, indent=1).encode()  # as Jupyter writes it
    r = client.post("/api/v1/notebooks/execute?x=40&name=abc&flags=[1,%20True]", data=raw,
                    headers={"Content-Type": "application/x-ipynb+json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed", body
    cells = body["notebook"]["cells"]
    assert cells[1]["metadata"]["tags"] == ["injected-parameters"]
    assert cells[1]["source"] == "# Parameters\nx = 40\nname = 'abc'\nflags = [1, True]"
    assert stdout_of(cells[2]) == "42 abc [1, True]\n"
    assert body["notebook"]["metadata"]["kernelspec"]["name"] == "python3"
    # The wrapped form takes query parameters too, over its own.
    r = client.post("/api/v1/notebooks/execute?x=5",
                    json={"notebook": nb, "parameters": {"x": 3, "name": "z"}})
    assert stdout_of(r.json()["notebook"]["cells"][2]) == "7 z None\n"
    # A file that is not a notebook is a 400 in the dialect's shape, not a 500.
    for junk in (b"", b"not json", b'{"cells": "nope", "nbformat": 4}'):
        r = client.post("/api/v1/notebooks/execute?x=1", data=junk)
        assert r.status_code == 400, (junk, r.text)
        assert set(r.json()) == {"message", "reason"}

    # And with curl itself, exactly as the README shows it (its default form Content-Type).
    path = tmp_path / "nb.ipynb"
    path.write_bytes(raw)
    started = time.monotonic()
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", f"X-API-Key: {client.headers['X-API-Key']}",
         "--data-binary", f"@{path}", f"{client.base}/api/v1/notebooks/execute?x=40"],
        capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "completed"
    assert stdout_of(out["notebook"]["cells"][2]) == "42 nobody None\n"
    print(f"curl notebook execute: {elapsed * 1000:.0f} ms")
