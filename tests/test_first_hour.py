"""What a new user meets in the first hour (issue 12): errors that say what is wrong and how to
fix it, quotas that name their holders, an output cap that says it cut. Real server, real kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from .support import ROOT, Client, Server, run_server

EX = "/api/v1/execute"


def name() -> str:
    return "fh-" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[Client]:
    _, secret = server.new_keypair()
    with server.client(secret) as c:
        yield c


# -- unknown routes and methods --------------------------------------------------------------------

def test_unknown_routes_are_a_generic_404_in_each_dialects_shape(api: Client) -> None:
    r = api.get("/no/such/route")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/problem+json"
    body = r.json()
    assert body["type"].endswith("/generic-not-found") and body["title"] == "Not found."
    assert "No route for GET /no/such/route" in body["msg"] and "kernel" not in r.text.lower()
    r = api.get(EX + "/no/such")
    assert r.status_code == 404 and set(r.json()) == {"detail"}
    assert r.json()["detail"].startswith("No route for GET /api/v1/execute/no/such")
    r = api.get("/api/v1/sessions/x/no/such")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "not_found"
    r = api.get("/api/no-such")
    assert r.status_code == 404 and r.json()["reason"] == "Not Found"
    assert "/api/openapi.json" in r.json()["message"]
    # a Backend.AI route with an unknown session still says which session is missing
    r = api.get("/session/" + name())
    assert r.status_code == 404 and r.json()["type"].endswith("/kernel-not-found")


def test_405_carries_allow(api: Client) -> None:
    r = api.get(EX)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert r.json() == {"detail": "GET is not allowed here; allowed: POST."}
    r = api.put("/api/kernels")
    assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) == {"GET", "POST"}


# -- keys ----------------------------------------------------------------------------------------

def test_an_access_key_sent_as_the_secret_is_named(server: Server) -> None:
    access, _ = server.new_keypair()
    for path, status, field in ((EX + "/languages", 403, "detail"), ("/session", 401, "msg"),
                                ("/api/kernels", 401, "message")):
        r = requests.get(server.url + path, headers={"X-API-Key": access}, timeout=10)
        assert r.status_code == status, r.text
        assert "looks like an access key; send the secret key" in r.json()[field], r.text
    r = requests.get(server.url + EX + "/languages", headers={"X-API-Key": "wrong"}, timeout=10)
    assert r.json() == {"detail": "Invalid API key."}


# -- unknown fields ------------------------------------------------------------------------------

def test_sandbox_refuses_unknown_fields_and_names_the_one_meant(api: Client) -> None:
    r = api.post(EX, json={"code": "print(input())", "language": "python", "stdn": "hi"})
    assert r.status_code == 422
    assert r.json() == {"detail": "stdn: unknown field (did you mean 'stdin'?)"}
    r = api.post(EX + "/batch", json=[{"code": "1", "language": "python", "sesion_id": "a"}])
    assert r.status_code == 422 and "did you mean 'session_id'" in r.json()["detail"]


def test_backendai_lists_unknown_fields_in_a_warning_header(api: Client) -> None:
    s = name()
    r = api.post("/session", json={"lang": "python", "name": s, "clientSesionToken": "x",
                                   "config": {"environ": {}, "enviro": {}}})
    assert r.status_code == 201, r.text
    assert r.headers["Warning"] == ('299 kernel-bridge "Unknown fields ignored: '
                                    'clientSesionToken, config.enviro"')
    # what backend.ai-client sends and this server ignores on purpose draws no warning
    r = api.post("/session", json={"lang": "python", "name": s, "tag": None, "type": "interactive",
                                   "config": {"scalingGroup": None, "resource_opts": {}}})
    assert r.status_code == 200 and "Warning" not in r.headers
    r = api.post(f"/session/{s}", json={"mode": "query", "code": "1", "runid": "x"})
    assert r.status_code == 200 and "runid" in r.headers["Warning"]
    api.delete(f"/session/{s}")


def test_jupyter_lists_unknown_fields_in_a_warning_header(api: Client) -> None:
    r = api.post("/api/kernels", json={"name": "kb-python", "path": "nb.ipynb", "nmae": "x"})
    assert r.status_code == 201, r.text
    assert r.headers["Warning"] == '299 kernel-bridge "Unknown fields ignored: nmae"'
    assert api.delete(f"/api/kernels/{r.json()['id']}").status_code == 204
    r = api.post("/api/v1/sessions", json={"mode": "dedicated", "max_tll": 5})
    assert r.status_code == 400 and "did you mean 'max_ttl'" in r.json()["errors"][0]["message"]


# -- input ------------------------------------------------------------------------------------------

def test_input_without_stdin_is_a_short_eof_error(api: Client) -> None:
    r = api.post(EX, json={"code": "x = input('name? ')", "language": "python"})
    body = r.json()
    assert body["exit_code"] == 1
    err = body["stderr"]
    assert "EOFError: EOF when reading a line" in err and "x = input('name? ')" in err
    assert "ipykernel" not in err and "site-packages" not in err and str(ROOT) not in err
    assert len(err.splitlines()) <= 8, err


def test_a_query_while_another_waits_for_input_is_a_clear_409(api: Client) -> None:
    s = name()
    assert api.post("/session", json={"lang": "python", "name": s}).status_code == 201
    first = api.post(f"/session/{s}", json={"mode": "query", "code": "print(input('> '))",
                                            "runId": None}).json()["result"]
    assert first["status"] == "waiting-input"
    r = api.post(f"/session/{s}", json={"mode": "query", "code": "print(2)", "runId": None})
    assert r.status_code == 409, r.text
    assert first["runId"] in r.json()["msg"] and "waits for input" in r.json()["msg"]
    r = api.post(f"/session/{s}", json={"mode": "input", "code": "ok", "runId": first["runId"]})
    assert r.json()["result"]["status"] == "finished"
    r = api.post(f"/session/{s}", json={"mode": "query", "code": "print(2)", "runId": None})
    assert r.json()["result"]["console"] == [["stdout", "2\n"]]
    api.delete(f"/session/{s}")


# -- quotas --------------------------------------------------------------------------------------

def kb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, check=True)


def test_quota_error_names_the_holders_and_the_cli_raises_the_limit(server: Server) -> None:
    made = json.loads(kb("keys", "create", "--concurrency", "2", "--data-dir",
                         str(server.data_dir), "--json").stdout)
    with server.client(made["secret_key"]) as c:
        held = name()
        assert c.post("/session", json={"lang": "python", "name": held}).status_code == 201
        r = c.post(EX, json={"code": "print(1)", "language": "python", "session_id": "mine"})
        assert r.status_code == 200, r.text
        r = c.post("/session", json={"lang": "python", "name": name()})
        assert r.status_code == 412
        msg = r.json()["msg"]
        assert "at most 2 concurrent sessions" in msg
        assert f"Held by: {held} (id " in msg and f"backendai: DELETE /session/{held})" in msg
        assert "sandbox: DELETE /api/v1/execute/session/mine)" in msg
        assert "kernel-bridge keys set-concurrency" in msg
        r = c.post(EX, json={"code": "1", "language": "python", "session_id": "other"})
        assert r.status_code == 429 and held in r.json()["detail"]
        kb("keys", "set-concurrency", made["access_key"], "3", "--data-dir",
           str(server.data_dir))
        listed = json.loads(kb("keys", "list", "--data-dir", str(server.data_dir),
                               "--json").stdout)
        assert {k["accessKey"]: k["concurrency"] for k in listed}[made["access_key"]] == 3
        deadline = time.monotonic() + 15  # a running server re-reads keypairs every 5 s
        while True:
            r = c.post("/session", json={"lang": "python", "name": name()})
            if r.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 201, r.text
        for s in c.get("/api/v1/sessions").json()["sessions"]:
            c.delete(f"/api/v1/sessions/{s['id']}/close")


# -- the output cap ----------------------------------------------------------------------------------

def test_sandbox_output_past_the_cap_is_cut_said_and_stopped() -> None:
    limit = 64 * 1024
    with run_server(output_limit=str(limit)) as srv, srv.client() as c:
        t = time.monotonic()
        r = c.post(EX, json={"code": "for i in range(1_000_000):\n    print(i)",
                             "language": "python", "timeout": 120})
        elapsed = time.monotonic() - t
        body = r.json()
        assert body["truncated"] is True
        assert len(body["stdout"]) == limit and body["stdout"].startswith("0\n1\n2\n")
        assert "output limit of 65536 bytes reached: the run was interrupted" in body["stderr"]
        # a million lines take far longer than this; the run stopped at the cap, not at 120 s
        assert elapsed < 30, elapsed
        r = c.post(EX, json={"code": "yes", "language": "bash", "timeout": 120})
        assert r.json()["truncated"] is True and len(r.json()["stdout"]) == limit
        small = c.post(EX, json={"code": "print('x' * 1000)", "language": "python"}).json()
        assert small["truncated"] is False and small["stderr"] == ""
        ex = c.post(EX + "/async", json={"code": "print('y' * 100_000)",
                                         "language": "python"}).json()
        for _ in range(200):
            st = c.get(f"{EX}/status/{ex['execution_id']}").json()
            if st["status"] in ("completed", "failed"):
                break
            time.sleep(0.1)
        assert st["result"]["truncated"] is True


def test_kernel_frames_are_dropped_from_tracebacks_but_user_frames_stay() -> None:
    from bridge.console import from_message

    tb = ["\x1b[31m---\x1b[0m", "EOFError    Traceback (most recent call last)",
          "Cell In[1], line 1\n----> 1 x = input()\n",
          "File \x1b[32m/srv/venv/lib/python3.11/site-packages/ipykernel/kernelbase.py:1571\x1b[0m,"
          " in Kernel._input_request\n-> 1571 raise EOFError",
          "File /home/work/comm/helpers.py:3, in read()\n----> 3 return input()",
          "EOFError: "]
    [[stream, text]] = from_message("error", {"ename": "EOFError", "evalue": "",
                                               "traceback": tb})
    assert stream == "stderr" and "site-packages" not in text and "\x1b" not in text
    assert "/home/work/comm/helpers.py" in text and "x = input()" in text
    assert text.rstrip().endswith("EOFError: EOF when reading a line (no more input: send it as "
                                  "stdin)")
