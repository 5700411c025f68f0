"""Jupyter Server's kernel REST API through the real server (issue 7)."""

from __future__ import annotations

import shutil
import time

import requests

from .jupyter_support import KernelSocket
from .support import Client, Server, console_text, run_server, run_to_end

MODEL_KEYS = {"id", "name", "last_activity", "execution_state", "connections"}


def assert_jupyter_error(r: requests.Response, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"message", "reason"} and body["message"], body


def test_api_version_and_token_auth(server: Server) -> None:
    r = requests.get(server.url + "/api", timeout=10,
                     headers={"Authorization": f"token {server.secret_key}"})
    assert r.status_code == 200 and r.json()["version"].startswith("2.")
    assert_jupyter_error(requests.get(server.url + "/api/kernels", timeout=10), 401)
    bad = requests.get(server.url + "/api/kernels", timeout=10,
                       headers={"Authorization": "token wrong"})
    assert_jupyter_error(bad, 401)


def test_kernelspecs(client: Client) -> None:
    r = client.get("/api/kernelspecs")
    assert r.status_code == 200
    body = r.json()
    # python3 is what almost every notebook names; listed, so a notebook keeps it when saved.
    assert body["default"] == "python3"
    specs = body["kernelspecs"]
    assert {"python3", "python", "kb-python", "kb-bash", "kb-c"} <= set(specs)
    assert specs["python3"]["spec"] == specs["python"]["spec"] == specs["kb-python"]["spec"]
    for name, model in specs.items():
        assert model["name"] == name
        assert model["spec"]["display_name"].endswith(" (kernel-bridge)"), model
        assert model["spec"]["language"]
        assert model["spec"]["interrupt_mode"] == "message"
        # Every kernel has both logos, served by the resources route.
        assert set(model["resources"]) >= {"logo-32x32", "logo-64x64"}, name
        for url in (model["resources"]["logo-32x32"], model["resources"]["logo-64x64"]):
            assert url.startswith(f"/kernelspecs/{name}/")
            logo = client.get(url)
            assert logo.status_code == 200 and logo.content[:4] == b"\x89PNG", url
    # Only languages whose toolchain is here are offered.
    for name, tool in (("kb-go", "go"), ("kb-rust", "rustc"), ("kb-ruby", "ruby")):
        assert (name in specs) == bool(shutil.which(tool))
    one = client.get("/api/kernelspecs/kb-c")
    assert one.status_code == 200 and one.json()["spec"]["language"] == "c"
    assert client.get("/api/kernelspecs/python3").json()["name"] == "python3"
    assert_jupyter_error(client.get("/api/kernelspecs/cobol"), 404)


def test_kernelspec_logo_and_no_escape(client: Client) -> None:
    logos = client.get("/api/kernelspecs/kb-python").json()["resources"]
    r = client.get(logos["logo-64x64"])
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "image/png" and r.content[:4] == b"\x89PNG"
    # The route matches (the slashes are escaped); the core refuses the path that leaves the
    # kernelspec's directory.
    assert_jupyter_error(client.get("/kernelspecs/kb-python/..%2F..%2Fkernels.py"), 400)
    assert_jupyter_error(client.get("/kernelspecs/kb-python/kernel.json"), 404)
    assert_jupyter_error(client.get("/kernelspecs/kb-python/nope.png"), 404)


def test_kernel_lifecycle_is_a_session(client: Client) -> None:
    before = {k["id"] for k in client.get("/api/kernels").json()}
    r = client.post("/api/kernels", json={
        "name": "python3", "env": {"KERNEL_USERNAME": "ada", "PATH": "/nowhere"}})
    assert r.status_code == 201, r.text
    model = r.json()
    assert set(model) == MODEL_KEYS
    assert model["name"] == "python3" and model["execution_state"] == "idle"
    assert model["connections"] == 0 and model["last_activity"].endswith("Z")
    kid = model["id"]
    assert r.headers["Location"] == f"/api/kernels/{kid}"
    listed = {k["id"]: k for k in client.get("/api/kernels").json()}
    assert set(listed) == before | {kid}
    # The same session through the Backend.AI dialect: KERNEL_* passed, PATH did not.
    job_view = client.get(f"/api/v1/sessions/{kid}")
    assert job_view.status_code == 200 and job_view.json()["id"] == kid
    info = client.get(f"/session/{kid}")
    assert info.status_code == 200 and info.json()["lang"] == "python"
    results = run_to_end(client, "/session", kid,
                         "import os\nprint(os.environ.get('KERNEL_USERNAME'), "
                         "os.environ['PATH'] != '/nowhere')")
    assert console_text(results, "stdout") == "ada True\n"
    assert client.get(f"/api/kernels/{kid}").json()["last_activity"] >= model["last_activity"]
    assert client.delete(f"/api/kernels/{kid}").status_code == 204
    assert_jupyter_error(client.get(f"/api/kernels/{kid}"), 404)
    assert kid not in {k["id"] for k in client.get("/api/kernels").json()}
    assert_jupyter_error(client.delete(f"/api/kernels/{kid}"), 404)
    assert_jupyter_error(client.post(f"/api/kernels/{kid}/interrupt"), 404)
    assert_jupyter_error(client.post(f"/api/kernels/{kid}/restart"), 404)


def test_bad_requests_change_nothing(client: Client) -> None:
    before = client.get("/api/kernels").json()
    assert_jupyter_error(client.post("/api/kernels", json={"name": "cobol"}), 404)
    assert_jupyter_error(client.post("/api/kernels", data=b"{not json"), 400)
    assert_jupyter_error(client.post("/api/kernels", json={"name": 5}), 400)
    assert client.get("/api/kernels").json() == before


def test_other_keypairs_kernels_are_invisible(server: Server, client: Client) -> None:
    r = client.post("/api/kernels", json={"name": "kb-bash"})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        _, secret = server.new_keypair()
        with server.client(secret) as other:
            assert kid not in {k["id"] for k in other.get("/api/kernels").json()}
            assert_jupyter_error(other.get(f"/api/kernels/{kid}"), 404)
            assert_jupyter_error(other.delete(f"/api/kernels/{kid}"), 404)
    finally:
        client.delete(f"/api/kernels/{kid}")


def test_idle_kernel_is_culled_but_not_while_a_cell_runs() -> None:
    # GatewayClient takes a kernel missing from GET /api/kernels for culled.
    # Idle 6 s: long enough that a loaded machine connects the socket before the cull, shorter
    # than the cell, so a cell that runs is what keeps the kernel.
    with run_server(idle_timeout_s="6", reaper_interval_s="0.3") as srv, srv.client() as c:
        kid = c.post("/api/kernels", json={"name": "python3"}).json()["id"]
        sock = KernelSocket(srv.url, kid, srv.secret_key)
        try:
            out, reply = sock.run("import time\ntime.sleep(8)\nprint('slept')", timeout=30)
            assert out == "slept\n", reply
            assert kid in {k["id"] for k in c.get("/api/kernels").json()}
        finally:
            sock.close()
        deadline = time.monotonic() + 25
        while kid in {k["id"] for k in c.get("/api/kernels").json()}:
            assert time.monotonic() < deadline, "idle kernel was never culled"
            time.sleep(0.3)
        assert_jupyter_error(c.get(f"/api/kernels/{kid}"), 404)


def test_every_name_of_the_python_kernel_starts_it(client: Client) -> None:
    """The model echoes the name asked for: JupyterLab saves that name into the notebook."""
    for name in ("python", "kb-python", None):
        r = client.post("/api/kernels", json={} if name is None else {"name": name})
        assert r.status_code == 201, r.text
        model = r.json()
        try:
            assert model["name"] == (name or "python3")
            assert client.get(f"/api/kernels/{model['id']}").json()["name"] == model["name"]
            assert client.get(f"/session/{model['id']}").json()["lang"] == "python"
        finally:
            client.delete(f"/api/kernels/{model['id']}")
