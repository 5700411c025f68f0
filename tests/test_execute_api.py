"""The Sandbox execute API (seed 003, issue 5) through the real server and real kernels."""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .support import Client, Server, run_server

EX = "/api/v1/execute"
FIELDS = {"execution_id", "stdout", "stderr", "exit_code", "execution_time", "language",
          "session_id", "truncated", "reason", "signal", "compile_stdout", "compile_stderr",
          "test_results"}


@pytest.fixture(scope="module")
def api(server: Server) -> Iterator[Client]:
    """A keypair of this module's own: its rate-limit budget is not shared with other files."""
    _, secret = server.new_keypair()
    with server.client(secret) as c:
        yield c


def run(client: Client, code: str, language: str = "python", **extra: Any) -> dict[str, Any]:
    r = client.post(EX, json={"code": code, "language": language, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == FIELDS
    return body


def poll(client: Client, execution_id: str, until: tuple[str, ...],
         seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        r = client.get(f"{EX}/status/{execution_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] in until:
            return r.json()
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.1)


# -- auth and errors -----------------------------------------------------------------------------

def test_missing_key_is_401_and_wrong_key_is_403(server: Server) -> None:
    routes = [("POST", EX), ("POST", EX + "/async"), ("GET", EX + "/status/x"),
              ("POST", EX + "/batch"), ("GET", EX + "/languages"),
              ("GET", EX + "/language/python/info"), ("DELETE", EX + "/session/x")]
    for method, path in routes:
        r = requests.request(method, server.url + path, json={}, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert set(r.json()) == {"detail"} and r.headers["WWW-Authenticate"] == "ApiKey"
        r = requests.request(method, server.url + path, json={}, timeout=10,
                             headers={"X-API-Key": "not-a-key"})
        assert r.status_code == 403, (path, r.text)
        assert r.json() == {"detail": "Invalid API key."}


def test_malformed_bodies_are_422_and_unsupported_languages_400(api: Client) -> None:
    for body in ({}, {"language": "python"}, {"code": "1", "language": "python", "timeout": 301},
                 {"code": "1", "language": "python", "timeout": 0},
                 {"code": "1", "language": "python", "environment": {"A": 1}}, [1]):
        for path in (EX, EX + "/async"):
            r = api.post(path, json=body)
            assert r.status_code == 422, (path, body, r.text)
            assert isinstance(r.json()["detail"], str)
    r = api.post(EX, data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    for path in (EX, EX + "/async"):
        r = api.post(path, json={"code": "print(1)", "language": "cobol"})
        assert r.status_code == 400
        assert r.json()["detail"].startswith("Unsupported language: cobol")
    r = api.post(EX, json={"code": "1", "language": "python", "environment": {"A-B": "1"}})
    assert r.status_code == 400 and "A-B" in r.json()["detail"]
    r = api.get(EX + "/status/" + str(uuid.uuid4()))
    assert r.status_code == 404 and r.json()["detail"].endswith("not found")


def test_languages_and_info(api: Client) -> None:
    r = api.get(EX + "/languages")
    assert r.status_code == 200
    by_name = {lang["language"]: lang for lang in r.json()}
    assert {"python", "javascript", "go", "ruby", "bash", "c", "cpp", "java", "rust"} <= set(
        by_name)
    assert by_name["python"]["version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert "py" in by_name["python"]["aliases"] and "golang" in by_name["go"]["aliases"]
    for lang in by_name.values():
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", lang["version"]), lang
    info = api.get(EX + "/language/py/info").json()
    assert info["language"] == "python" and info["available"] is True
    assert info["version"] == by_name["python"]["version"] and "py" in info["aliases"]
    assert info["file_extension"] == ".py" and info["max_execution_time"] == 300
    assert info["default_execution_time"] == 30 and info["max_memory"].endswith("m")
    r = api.get(EX + "/language/cobol/info")
    assert r.status_code == 404 and r.json() == {"detail": "Language cobol not supported"}


# -- one execution ---------------------------------------------------------------------------------

def test_result_fields_stdin_and_exit_codes(api: Client) -> None:
    body = run(api, "print(1)")
    assert uuid.UUID(body["execution_id"])
    assert (body["stdout"], body["stderr"], body["exit_code"]) == ("1\n", "", 0)
    assert body["language"] == "python" and body["session_id"] is None
    assert 0 < body["execution_time"] < 10
    # Nadoo's real route has a trailing slash
    assert api.post(EX + "/", json={"code": "print(2)", "language": "python"}).json()[
        "stdout"] == "2\n"
    body = run(api, "name = input()\nimport sys\nprint('hi', name, sys.stdin.read().split())",
               stdin="bob\nx y\n")
    assert body["stdout"] == "hi bob ['bob', 'x', 'y']\n"
    body = run(api, "print('before')\n1/0")
    assert body["exit_code"] == 1 and body["stdout"] == "before\n"
    assert "ZeroDivisionError" in body["stderr"] and "\x1b[" not in body["stderr"]
    assert run(api, "import sys\nsys.exit(3)")["exit_code"] == 3
    assert run(api, "echo out; echo err >&2; exit 4", "bash") | {"execution_id": None,
                                                                  "execution_time": 0} == {
        "execution_id": None, "execution_time": 0, "stdout": "out\n", "stderr": "err\n",
        "exit_code": 4, "language": "bash", "session_id": None, "truncated": False,
        "reason": "runtime_error", "signal": None, "compile_stdout": None,
        "compile_stderr": None, "test_results": None}


def test_timeout_gives_minus_one_and_keeps_output(api: Client) -> None:
    t0 = time.monotonic()
    body = run(api, "print('started', flush=True)\nwhile True: pass", timeout=1)
    assert time.monotonic() - t0 < 15
    assert body["exit_code"] == -1 and body["stdout"] == "started\n"
    assert "timed out after 1 s" in body["stderr"]
    assert 1 <= body["execution_time"] < 5


def test_no_session_id_means_a_fresh_kernel_and_an_empty_dir(api: Client) -> None:
    first = run(api, "import os\nsecret = 41\nopen('left.txt', 'w').write('x')\n"
                     "os.environ['LEAK'] = '1'\nprint(sorted(os.listdir('.')))")
    assert "left.txt" in first["stdout"]
    second = run(api, "import os\nprint('secret' in globals(), os.path.exists('left.txt'),"
                      " 'LEAK' in os.environ)")
    assert second["stdout"] == "False False False\n"


def test_environment_applies_to_that_execution_only(api: Client) -> None:
    sid = "env-" + uuid.uuid4().hex[:8]
    code = "import os\nprint(os.environ.get('STAGE'))"
    assert run(api, code, environment={"STAGE": "dev"}, session_id=sid)["stdout"] == "dev\n"
    assert run(api, code, session_id=sid)["stdout"] == "None\n"
    js = "console.log(process.env.STAGE)"
    assert run(api, js, "javascript", environment={"STAGE": "js"})["stdout"] == "js\n"
    # A compiled language gets its variables from a kernel started with them.
    go = ('package main\nimport ("fmt"; "os")\nfunc main() { fmt.Println(os.Getenv("STAGE")) }')
    assert run(api, go, "go", environment={"STAGE": "go"})["stdout"] == "go\n"
    r = api.post(EX, json={"code": go, "language": "go", "environment": {"A": "1"},
                           "session_id": sid})
    assert r.status_code == 400  # a go session cannot change its kernel's environment
    assert api.delete(f"{EX}/session/{sid}").status_code == 200


def test_session_keeps_state_until_deleted(api: Client) -> None:
    sid = "state-" + uuid.uuid4().hex[:8]
    body = run(api, "x = 20\nopen('kept.txt', 'w').write('y')", session_id=sid)
    assert body["session_id"] == sid and body["exit_code"] == 0
    assert run(api, "print(x * 2 + 2, open('kept.txt').read())", session_id=sid)[
        "stdout"] == "42 y\n"
    r = api.post(EX, json={"code": "1", "language": "javascript", "session_id": sid})
    assert r.status_code == 400 and "runs python" in r.json()["detail"]
    # A timeout restarts the session's kernel; the next execution runs on the new one.
    assert run(api, "while True: pass", session_id=sid, timeout=1)["exit_code"] == -1
    after = run(api, "print('x' in globals())", session_id=sid)
    assert after["stdout"] == "False\n" and after["exit_code"] == 0
    r = api.delete(f"{EX}/session/{sid}")
    assert r.status_code == 200 and r.json() == {"message": f"Session {sid} cleaned up"}
    assert api.delete(f"{EX}/session/{sid}").status_code == 404
    fresh = run(api, "import os\nprint(os.path.exists('kept.txt'))", session_id=sid)
    assert fresh["stdout"] == "False\n"
    assert api.delete(f"{EX}/session/{sid}").status_code == 200


def test_async_execution_and_polling(api: Client, server: Server) -> None:
    r = api.post(EX + "/async", json={"code": "import time\ntime.sleep(1)\nprint('done')",
                                      "language": "python"})
    assert r.status_code == 200
    sub = r.json()
    assert sub["status"] == "pending" and sub["result"] is None and sub["created_at"]
    eid = sub["execution_id"]
    running = poll(api, eid, ("running", "completed"))
    assert running["started_at"]
    done = poll(api, eid, ("completed", "failed"))
    assert done["status"] == "completed" and done["completed_at"] and done["error"] is None
    assert done["result"]["stdout"] == "done\n" and done["result"]["exit_code"] == 0
    assert done["result"]["execution_id"] == eid
    # A synchronous execution is pollable too; another keypair sees neither.
    sync_id = run(api, "print(5)")["execution_id"]
    assert api.get(f"{EX}/status/{sync_id}").json()["result"]["stdout"] == "5\n"
    with server.client() as other:
        assert other.get(f"{EX}/status/{eid}").status_code == 404
    failed = api.post(EX + "/async", json={"code": "while True: pass", "language": "python",
                                           "timeout": 1}).json()
    end = poll(api, failed["execution_id"], ("completed", "failed"))
    assert end["status"] == "failed" and "timed out" in end["error"]
    assert end["result"]["exit_code"] == -1


# -- batches (seed 003's examples verbatim) ------------------------------------------------------

def test_batch_multi_language_example(api: Client) -> None:
    r = api.post(EX + "/batch", json=[
        {"code": "print(2 + 2)", "language": "python"},
        {"code": "console.log(3 + 3)", "language": "javascript"},
        {"code": "package main\nimport \"fmt\"\nfunc main() { fmt.Println(4 + 4) }",
         "language": "go"},
    ])
    assert r.status_code == 200, r.text
    results = r.json()
    assert [(x["language"], x["stdout"], x["stderr"], x["exit_code"]) for x in results] == [
        ("python", "4\n", "", 0), ("javascript", "6\n", "", 0), ("go", "8\n", "", 0)]
    assert all(set(x) == FIELDS and x["session_id"] is None for x in results)
    assert len({x["execution_id"] for x in results}) == 3
    # the Python client example
    batch = [{"code": "print('Python')", "language": "python"},
             {"code": "console.log('JavaScript')", "language": "javascript"},
             {"code": "puts 'Ruby'", "language": "ruby"}]
    results = api.post(EX + "/batch", json=batch).json()
    assert [(x["language"], x["stdout"].strip(), x["exit_code"]) for x in results] == [
        ("python", "Python", 0), ("javascript", "JavaScript", 0), ("ruby", "Ruby", 0)]


def test_batch_test_cases_and_per_item_environment_examples(api: Client) -> None:
    results = api.post(EX + "/batch", json=[
        {"code": "def add(a, b):\n    return a + b\nprint(add(2, 3))", "language": "python",
         "session_id": "test-session-1"},
        {"code": "def add(a, b):\n    return a + b\nprint(add(-1, 1))", "language": "python",
         "session_id": "test-session-1"},
        {"code": "def add(a, b):\n    return a + b\nprint(add(0, 0))", "language": "python",
         "session_id": "test-session-1"},
    ]).json()
    assert [x["stdout"] for x in results] == ["5\n", "0\n", "0\n"]
    assert all(x["session_id"] == "test-session-1" and x["exit_code"] == 0 for x in results)
    assert api.delete(f"{EX}/session/test-session-1").status_code == 200
    results = api.post(EX + "/batch", json=[
        {"code": "import os\nprint(os.environ[\"ENV\"])", "language": "python",
         "environment": {"ENV": "development"}, "timeout": 10},
        {"code": "import os\nprint(os.environ[\"ENV\"])", "language": "python",
         "environment": {"ENV": "production"}, "timeout": 5},
    ]).json()
    assert [x["stdout"] for x in results] == ["development\n", "production\n"]


def test_batch_item_failure_is_minus_one_and_the_rest_complete(api: Client) -> None:
    results = api.post(EX + "/batch", json=[
        {"code": "print('Success')", "language": "python"},
        {"code": "import os\nos._exit(9)", "language": "python"},  # the kernel dies
        {"code": "while True: pass", "language": "python", "timeout": 1},
        {"code": "print('Success')", "language": "python"},
    ]).json()
    assert [x["exit_code"] for x in results] == [0, -1, -1, 0]
    assert results[0]["stdout"] == results[3]["stdout"] == "Success\n"
    assert "kernel died" in results[1]["stderr"] and "timed out" in results[2]["stderr"]


def test_batch_refusals_run_nothing(api: Client) -> None:
    item = {"code": "print(1)", "language": "python"}
    r = api.post(EX + "/batch", json=[item] * 11)
    assert r.status_code == 400
    assert r.json() == {"detail": "Maximum 10 executions allowed in a batch"}
    sid = "never-" + uuid.uuid4().hex[:8]
    r = api.post(EX + "/batch", json=[{**item, "session_id": sid},
                                      {"code": "x", "language": "invalid"}])
    assert r.status_code == 400 and r.json()["detail"].startswith("Unsupported language: invalid")
    assert api.delete(f"{EX}/session/{sid}").status_code == 404  # the first item never ran
    assert api.post(EX + "/batch", json=item).status_code == 422
    assert api.post(EX + "/batch", json=[{"language": "python"}]).status_code == 422
    assert api.post(EX + "/batch", json=[]).json() == []


# -- servers of their own ------------------------------------------------------------------------

def test_rate_limit_per_keypair_counts_batch_items() -> None:
    with run_server(rate_limit="3", pool_python="1") as server, server.client() as c:
        assert c.post(EX, json={"code": "print(1)", "language": "python"}).status_code == 200
        r = c.post(EX + "/batch", json=[{"code": "print(1)", "language": "python"}] * 3)
        assert r.status_code == 429
        assert r.json() == {"detail": "Rate limit exceeded: at most 3 executions per minute."}
        assert c.post(EX + "/batch", json=[{"code": "1", "language": "python"}] * 2
                      ).status_code == 200
        assert c.post(EX + "/async", json={"code": "1", "language": "python"}).status_code == 429
        _, other = server.new_keypair()
        with server.client(other) as c2:
            assert c2.post(EX, json={"code": "1", "language": "python"}).status_code == 200


def test_async_execution_cut_off_by_a_restart_reads_failed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data_dir=data, pool_python="1") as first, first.client() as c:
        secret = first.secret_key
        done = run(c, "print('kept')")["execution_id"]
        eid = c.post(EX + "/async", json={"code": "import time\ntime.sleep(120)",
                                          "language": "python", "timeout": 300}
                     ).json()["execution_id"]
        poll(c, eid, ("running",))
    with run_server(data_dir=data, pool_python="0") as second, second.client(secret) as c:
        cut = c.get(f"{EX}/status/{eid}").json()
        assert cut["status"] == "failed" and cut["completed_at"]
        assert "server" in cut["error"] and cut["result"]["exit_code"] == -1
        kept = c.get(f"{EX}/status/{done}").json()
        assert kept["status"] == "completed" and kept["result"]["stdout"] == "kept\n"


def test_javascript_reads_stdin_for_that_execution_only(api: Client) -> None:
    body = run(api, "const lines = require('fs').readFileSync(0, 'utf8').trim().split('\\n');\n"
                    "const [a, b] = lines[0].split(' ').map(Number);\nconsole.log(a + b, lines[1]);",
               "javascript", stdin="3 4\nhello\n")
    assert (body["stdout"], body["exit_code"]) == ("7 hello\n", 0), body
    body = run(api, "const rl = require('readline').createInterface({input: process.stdin});\n"
                    "const got = [];\nfor await (const line of rl) got.push(line);\n"
                    "console.log(got.join('+'));", "javascript", stdin="x\ny\n")
    assert body["stdout"] == "x+y\n", body
    sid = f"js-{uuid.uuid4().hex[:8]}"
    assert run(api, "console.log(require('fs').readFileSync('/dev/stdin', 'utf8'))",
               "javascript", stdin="abc", session_id=sid)["stdout"] == "abc\n"
    # the next execution in the same session reads its own (empty) stdin, not the last one's
    assert run(api, "console.log(require('fs').readFileSync(0).length)", "javascript",
               session_id=sid)["stdout"] == "0\n"
    assert api.delete(f"{EX}/session/{sid}").status_code == 200
