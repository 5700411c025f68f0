"""A real jupyter_server process with its GatewayClient pointed at kernel-bridge (issue 7): what
``jupyter lab --gateway-url=…`` does, driven through jupyter_server's own REST and WebSocket
API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import nbformat
import pytest
import requests

from .jupyter_support import KernelSocket
from .support import Client, Server, jupyter_app


@dataclass
class JupyterServer:
    url: str
    token: str

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, params={"token": self.token}, timeout=60)


@pytest.fixture(scope="module")
def jupyter(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    tmp = tmp_path_factory.mktemp("jupyter")
    with jupyter_app("jupyter_server", server, tmp, tmp) as (url, token, _log):
        yield JupyterServer(url, token)


def test_kernelspecs_come_from_kernel_bridge(jupyter: JupyterServer) -> None:
    # jupyter_server adopts the gateway's default from its next listing on (managers.py
    # get_all_specs), so the second answer shows it.
    assert jupyter.get("/api/kernelspecs").status_code == 200
    r = jupyter.get("/api/kernelspecs")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["default"] == "python3"
    assert {"python3", "kb-python", "kb-bash", "kb-c"} <= set(body["kernelspecs"])
    for name in ("python3", "kb-python", "kb-bash", "kb-c"):
        spec = body["kernelspecs"][name]
        assert spec["spec"]["display_name"].endswith(" (kernel-bridge)")
        for size in ("32x32", "64x64"):
            png = jupyter.get(spec["resources"][f"logo-{size}"])
            assert png.status_code == 200 and png.content[:4] == b"\x89PNG", (name, size)


def test_run_code_through_jupyter_server(jupyter: JupyterServer, server: Server,
                                         client: Client) -> None:
    r = requests.post(jupyter.url + "/api/kernels", params={"token": jupyter.token},
                      json={"name": "kb-python"}, timeout=60)
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        # The kernel lives in kernel-bridge: a session like any other.
        assert kid in {k["id"] for k in client.get("/api/kernels").json()}
        assert client.get(f"/session/{kid}").json()["lang"] == "python"
        # jupyter_server's own WebSocket; it relays to kernel-bridge's.
        sock = KernelSocket(jupyter.url, kid, jupyter.token)
        try:
            out, reply = sock.run("import sys\nprint(sum(range(10)), sys.platform)")
            assert reply["content"]["status"] == "ok"
            assert out == "45 linux\n"
            # jupyter_server learns of the run's end from the same iopub status we saw: it
            # settles on idle, shortly.
            deadline = time.monotonic() + 10
            while (model := jupyter.get(f"/api/kernels/{kid}").json())["execution_state"] != "idle":
                assert time.monotonic() < deadline, model
                time.sleep(0.1)
            assert model["id"] == kid and model["name"] == "kb-python"
        finally:
            sock.close()
        restarted = requests.post(f"{jupyter.url}/api/kernels/{kid}/restart",
                                  params={"token": jupyter.token}, timeout=60)
        assert restarted.status_code == 200, restarted.text
    finally:
        gone = requests.delete(f"{jupyter.url}/api/kernels/{kid}",
                               params={"token": jupyter.token}, timeout=60)
    assert gone.status_code == 204
    assert kid not in {k["id"] for k in client.get("/api/kernels").json()}


def test_python3_notebook_opens_runs_and_keeps_its_kernelspec(jupyter: JupyterServer,
                                                               client: Client) -> None:
    """What JupyterLab does with a notebook written by an ordinary Jupyter: a session for the
    notebook's kernelspec ``python3``, code over jupyter_server's socket, and the kernelspec it
    writes back on save taken from the kernel's name and that name's spec."""
    params = {"token": jupyter.token}
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(sum(range(10)))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    put = requests.put(f"{jupyter.url}/api/contents/nb.ipynb", params=params, timeout=60,
                       json={"type": "notebook", "format": "json", "content": nb})
    assert put.status_code == 201, put.text  # a new file
    r = requests.post(f"{jupyter.url}/api/sessions", params=params, timeout=60,
                      json={"path": "nb.ipynb", "type": "notebook", "name": "nb.ipynb",
                            "kernel": {"name": "python3"}})
    assert r.status_code == 201, r.text
    kernel = r.json()["kernel"]
    try:
        assert kernel["name"] == "python3"
        assert {"id": kernel["id"], "name": "python3"}.items() <= {
            k["id"]: k for k in client.get("/api/kernels").json()}[kernel["id"]].items()
        sock = KernelSocket(jupyter.url, kernel["id"], jupyter.token)
        try:
            out, reply = sock.run(nb.cells[0].source)
            assert reply["content"]["status"] == "ok" and out == "45\n"
        finally:
            sock.close()
        # JupyterLab saves {"name": kernel.name, "display_name": specs[kernel.name]…}.
        specs = jupyter.get("/api/kernelspecs").json()["kernelspecs"]
        spec = specs[kernel["name"]]["spec"]
        nb.metadata["kernelspec"] = {"name": kernel["name"],
                                     "display_name": spec["display_name"],
                                     "language": spec["language"]}
        requests.put(f"{jupyter.url}/api/contents/nb.ipynb", params=params, timeout=60,
                     json={"type": "notebook", "format": "json", "content": nb})
        saved = jupyter.get("/api/contents/nb.ipynb").json()["content"]
        assert saved["metadata"]["kernelspec"] == {
            "name": "python3", "display_name": "Python 3 (kernel-bridge)", "language": "python"}
    finally:
        requests.delete(f"{jupyter.url}/api/sessions/{r.json()['id']}", params=params,
                        timeout=60)
