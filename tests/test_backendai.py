"""The Backend.AI kernel API through the real server (issue 2)."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from bridge.doctor import cgroups

from .support import Client, Server, console_text, run_to_end


def new_name() -> str:
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture
def session(client: Client) -> str:
    name = new_name()
    r = client.post("/session", json={"lang": "python3", "name": name})
    assert r.status_code == 201, r.text
    yield name
    client.delete(f"/session/{name}")


def test_hello_needs_no_auth(server: Server) -> None:
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200
    assert r.json()["version"] == "v5.20191215"
    assert r.json()["manager"].startswith("kernel-bridge")


def test_create_reuse_and_both_ids(client: Client) -> None:
    name = new_name()
    r = client.post("/session", json={"image": "lablup/python:3.9", "name": name})
    assert r.status_code == 201
    body = r.json()
    assert body["created"] is True and body["sessionName"] == name
    sid = str(uuid.UUID(body["sessionId"]))
    again = client.post("/session", json={"lang": "python3", "name": name})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["sessionId"] == sid
    # v4 route forms and the UUID name the same session
    assert client.get(f"/kernel/{name}").status_code == 200
    assert client.get(f"/v2/kernel/{sid}").status_code == 200
    refused = client.post("/session", json={"lang": "python", "name": name,
                                            "reuseIfExists": False})
    assert refused.status_code == 400
    assert client.delete(f"/session/{sid}").status_code == 200


def test_create_route_forms(client: Client) -> None:
    for path, key in (("/v2/kernel/create", "clientSessionToken"), ("/kernel", "clientSessionToken"),
                      ("/session/_/create", "name")):
        name = new_name()
        r = client.post(path, json={"lang": "python", key: name})
        assert r.status_code == 201, (path, r.text)
        assert r.json()["kernelId"] == name
        assert client.delete(f"/kernel/{name}").status_code == 200


def test_state_kept_between_queries(client: Client, session: str) -> None:
    run_to_end(client, "/session", session, "x = 20")
    results = run_to_end(client, "/session", session, "print(x * 2 + 2)")
    assert results[-1]["status"] == "finished"
    assert results[-1]["exitCode"] == 0
    assert console_text(results, "stdout") == "42\n"


def test_expression_result_and_traceback(client: Client, session: str) -> None:
    results = run_to_end(client, "/session", session, "1 + 1")
    assert results[-1]["console"] == [["stdout", "2\n"]]
    results = run_to_end(client, "/session", session, "print('before')\n1/0")
    final = results[-1]
    assert final["exitCode"] == 0  # seed 002: query mode with global context is always 0
    assert final["console"][0] == ["stdout", "before\n"]
    kind, text = final["console"][1]
    assert kind == "stderr" and "ZeroDivisionError" in text and "\x1b[" not in text


def test_continued_then_finished_keeps_order(client: Client, session: str) -> None:
    code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.7)"
    results = run_to_end(client, "/session", session, code)
    statuses = [r["status"] for r in results]
    assert statuses[0] == "continued" and statuses[-1] == "finished"
    assert len({r["runId"] for r in results}) == 1
    assert console_text(results, "stdout") == "".join(f"{i}\n" for i in range(6))


def test_stdout_and_stderr_apart_and_merged(client: Client, session: str) -> None:
    # ipykernel buffers each stream; flushing is what fixes the interleaving
    code = ("import sys\nprint('a'); print('b', flush=True)\n"
            "sys.stderr.write('e1\\n'); sys.stderr.flush()\nprint('c')")
    console = run_to_end(client, "/session", session, code)[-1]["console"]
    assert console == [["stdout", "a\nb\n"], ["stderr", "e1\n"], ["stdout", "c\n"]]


def test_input_round_trip_and_password(client: Client, session: str) -> None:
    r = client.post(f"/session/{session}", json={
        "mode": "query", "runId": None,
        "code": "name = input('Name? ')\nimport getpass\npw = getpass.getpass('PW: ')\n"
                "print('hi', name, len(pw))"}).json()["result"]
    assert r["status"] == "waiting-input"
    assert r["options"] == {"is_password": False}
    assert r["console"] == [["stdout", "Name? "]]
    r = client.post(f"/session/{session}", json={"mode": "input", "code": "Lablup",
                                                 "runId": r["runId"]}).json()["result"]
    assert r["status"] == "waiting-input" and r["options"] == {"is_password": True}
    r = client.post(f"/session/{session}", json={"mode": "input", "code": "secret",
                                                 "runId": r["runId"]}).json()["result"]
    assert r["status"] == "finished"
    assert console_text([r], "stdout").endswith("hi Lablup 6\n")


def test_media_and_html(client: Client, session: str) -> None:
    code = ("from IPython.display import display, HTML, SVG, Image\n"
            "import base64\n"
            "png = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
            "nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==')\n"
            "display(Image(data=png, format='png'))\n"
            "display(HTML('<b>bold</b>'))\n"
            "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>'))")
    console = run_to_end(client, "/session", session, code)[-1]["console"]
    kinds = [item[0] for item in console]
    assert kinds == ["media", "html", "media"]
    assert console[0][1][0] == "image/png"
    assert console[0][1][1].startswith("data:image/png;base64,iVBOR")
    assert console[1][1] == "<b>bold</b>"
    assert console[2][1][0] == "image/svg+xml" and console[2][1][1].startswith("<svg")


def test_info_fields_are_measured(client: Client, session: str) -> None:
    run_to_end(client, "/session", session, "sum(i*i for i in range(3_000_000))")
    info = client.get(f"/session/{session}").json()
    assert info["lang"] == "python"
    assert info["numQueriesExecuted"] == 1
    assert info["age"] > 0 and info["idle"] >= 0
    assert 10_000 < info["memoryUsed"] < 1_000_000  # KiB of a real ipykernel
    assert info["cpuCreditUsed"] > 100  # ms: the kernel's start plus the sum
    time.sleep(0.3)
    assert client.get(f"/session/{session}").json()["idle"] >= 300


def test_restart_drops_globals(client: Client, session: str) -> None:
    run_to_end(client, "/session", session, "x = 1")
    assert client.patch(f"/session/{session}").status_code == 204
    results = run_to_end(client, "/session", session, "print(x)")
    assert "NameError" in console_text(results, "stderr")
    info = client.get(f"/session/{session}").json()
    assert info["numQueriesExecuted"] == 2


def test_interrupt_stops_running_code(client: Client, session: str) -> None:
    r = client.post(f"/session/{session}", json={
        "mode": "query", "runId": None, "code": "import time\ntime.sleep(60)"}).json()["result"]
    assert r["status"] == "continued"
    started = time.monotonic()
    assert client.post(f"/session/{session}/interrupt").status_code == 204
    r = client.post(f"/session/{session}", json={"mode": "continue", "code": "",
                                                 "runId": r["runId"]}).json()["result"]
    assert r["status"] == "finished"
    assert "KeyboardInterrupt" in console_text([r], "stderr")
    assert time.monotonic() - started < 3
    assert console_text(run_to_end(client, "/session", session, "print('alive')"),
                        "stdout") == "alive\n"


def test_complete(client: Client, session: str) -> None:
    r = client.post(f"/session/{session}/complete", json={
        "code": "pri", "options": {"row": 0, "col": 3, "line": "pri", "post": ""}})
    assert r.status_code == 200
    assert r.json()["result"]["status"] == "finished"
    assert "print" in r.json()["result"]["completions"]


def test_destroy_returns_stats_then_404(client: Client) -> None:
    name = new_name()
    client.post("/session", json={"lang": "python", "name": name})
    run_to_end(client, "/session", name, "open('f.txt', 'w').write('x' * 100_000)")
    r = client.delete(f"/session/{name}")
    assert r.status_code == 200
    stats = r.json()["stats"]
    assert stats["cpu_used"] > 0 and stats["mem_max_bytes"] > 10_000_000
    assert set(stats) >= {"net_rx_bytes", "net_tx_bytes", "io_read_bytes", "io_write_bytes",
                          "mem_cur_bytes", "io_max_scratch_size"}
    assert client.get(f"/session/{name}").status_code == 404
    assert client.delete(f"/session/{name}").status_code == 404


def test_exec_timeout_destroys_the_kernel(client: Client) -> None:
    name = new_name()
    r = client.post("/session", json={"lang": "python", "name": name,
                                      "limits": {"execTimeout": 1500}})
    assert r.status_code == 201
    assert client.get(f"/session/{name}").json()["queryTimeout"] == 1500
    results = run_to_end(client, "/session", name, "import time\ntime.sleep(30)")
    assert results[-1]["status"] == "exec-timeout"
    assert results[-1]["exitCode"] is None
    deadline = time.monotonic() + 10
    while client.get(f"/session/{name}").status_code != 404:
        assert time.monotonic() < deadline, "session survived its exec-timeout"
        time.sleep(0.2)


def test_memory_cap_contains_a_big_allocation(client: Client, server: Server) -> None:
    name = new_name()
    r = client.post("/session", json={"lang": "python", "name": name,
                                      "limits": {"maxMem": 300 * 1024}})
    assert r.status_code == 201
    results = run_to_end(client, "/session", name, "x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert "allocated" not in console_text(results, "stdout")
    if cgroups().verdict == "ok":
        # The cgroup's OOM killer ends the kernel: Backend.AI's code for a dead kernel.
        assert results[-1]["exitCode"] == 130, results[-1]
    else:
        # RLIMIT_AS alone: the allocation itself fails inside the program.
        assert "MemoryError" in console_text(results, "stderr"), results
    assert requests.get(server.url + "/", timeout=5).status_code == 200
    client.delete(f"/session/{name}")


def test_limits_above_hard_limits_are_406(client: Client) -> None:
    r = client.post("/session", json={"lang": "python", "name": new_name(),
                                      "limits": {"maxMem": 10**12}})
    assert r.status_code == 406
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/not-acceptable")


def test_bad_requests(client: Client, server: Server) -> None:
    r = client.post("/session", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["type"].endswith("/invalid-api-params")
    r = client.post("/session", json={"lang": "cobol", "name": new_name()})
    assert r.status_code == 400
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert "cobol" in r.json()["msg"]
    r = client.get("/session/no-such-session")
    assert r.status_code == 404 and r.json()["type"].endswith("/kernel-not-found")
    r = client.post("/session", json={"lang": "python", "name": "x"})  # too short a name
    assert r.status_code == 400
    r = requests.post(server.url + "/session", json={"lang": "python"}, timeout=10)
    assert r.status_code == 401 and r.json()["type"].endswith("/auth-failed")
    r = requests.get(server.url + "/session/x", headers={"X-API-Key": "wrong"}, timeout=10)
    assert r.status_code == 401
    r = client.post("/session", json={"lang": "python"}, headers={"X-BackendAI-Version": "v9.x"})
    assert r.status_code == 400


def test_bad_execute_requests(client: Client, session: str) -> None:
    r = client.post(f"/session/{session}", json={"mode": "dance", "code": ""})
    assert r.status_code == 400
    r = client.post(f"/session/{session}", json={"mode": "continue", "code": "", "runId": None})
    assert r.status_code == 400
    r = client.post(f"/session/{session}", json={"mode": "continue", "code": "", "runId": "nope"})
    assert r.status_code == 404
    r = client.post(f"/session/{session}", json={"mode": "input", "code": "x", "runId": "nope"})
    assert r.status_code == 404
    # a finished run cannot be fed input
    results = run_to_end(client, "/session", session, "1")
    r = client.post(f"/session/{session}", json={"mode": "input", "code": "x",
                                                 "runId": results[-1]["runId"]})
    assert r.status_code == 409


def test_other_keypair_cannot_see_sessions(server: Server, client: Client, session: str) -> None:
    _, secret = server.new_keypair()  # made by the CLI while the server runs
    with server.client(secret) as other:
        r = other.get(f"/session/{session}")
        assert r.status_code == 404
        assert other.post(f"/session/{session}", json={"mode": "query", "code": "1",
                                                       "runId": None}).status_code == 404
        assert other.delete(f"/session/{session}").status_code == 404


def test_bearer_auth(server: Server, session: str) -> None:
    r = requests.get(f"{server.url}/session/{session}",
                     headers={"Authorization": f"Bearer {server.secret_key}"}, timeout=10)
    assert r.status_code == 200
