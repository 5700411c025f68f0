"""The real Backend.AI SDK (backend.ai-client 23.9.10, HMAC-signed requests) against the real
server: a script runs under the SDK's own venv as a client process and reports what it saw."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from typing import Any

import pytest

from .support import SDK_PYTHON, Server

SCRIPT = textwrap.dedent('''
    import json, os, sys, time, uuid
    from pathlib import Path
    import ai.backend.client
    from ai.backend.client.exceptions import BackendAPIError
    from ai.backend.client.session import Session

    report = {"sdk_version": ai.backend.client.__version__}

    def run_to_end(sess, code, mode="query", opts=None, answers=()):
        answers, results, run_id = list(answers), [], None
        r = sess.execute(run_id, code, mode=mode, opts=opts)
        while True:
            results.append(r)
            run_id = r["runId"]
            if r["status"] in ("finished", "exec-timeout"):
                return results
            if r["status"] == "waiting-input":
                r = sess.execute(run_id, answers.pop(0), mode="input")
            else:
                r = sess.execute(run_id, "", mode="continue")

    def text(results, stream):
        return "".join(v for r in results for k, v in r["console"] if k == stream)

    name = "sdk-" + uuid.uuid4().hex[:8]
    with Session() as api:
        report["api_version"] = list(api.api_version)
        sess = api.ComputeSession.get_or_create("python:3.9", name=name)
        again = api.ComputeSession.get_or_create("python:3.9", name=name)
        report["same_session"] = str(again.id) == str(sess.id)

        res = run_to_end(sess, "x = 6 * 7\\nprint(x)")
        report["query"] = [text(res, "stdout"), res[-1]["exitCode"]]

        res = run_to_end(sess, "import time\\nfor i in range(3):\\n"
                               "    print(i, flush=True); time.sleep(1.2)")
        report["continue"] = [[r["status"] for r in res], text(res, "stdout")]

        res = run_to_end(sess, "name = input('who? ')\\nprint('hi', name)", answers=["sdk"])
        report["input"] = [[r["status"] for r in res], text(res, "stdout")]

        info = sess.get_info()
        report["info"] = [info["lang"], info["numQueriesExecuted"]]

        sess.restart()
        res = run_to_end(sess, "print('x' in globals())")
        report["after_restart"] = text(res, "stdout")

        first = sess.execute(None, "import time\\ntime.sleep(30)", mode="query")
        started = time.monotonic()
        sess.interrupt()
        res, r = [first], first
        while r["status"] not in ("finished", "exec-timeout"):
            r = sess.execute(r["runId"], "", mode="continue")
            res.append(r)
        report["interrupt"] = [time.monotonic() - started, "KeyboardInterrupt" in text(res, "stderr")]

        report["complete"] = sess.complete("impo", {"row": 0, "col": 4, "line": "impo"})

        # -- issue 3: files and a batch run ---------------------------------------------------
        work = Path(sys.argv[1])
        (work / "data").mkdir()
        blob = os.urandom(300_000)
        (work / "data" / "input.bin").write_bytes(blob)
        (work / "main.py").write_text(
            "import os\\n"
            "data = open('data/input.bin', 'rb').read()\\n"
            "os.makedirs('out', exist_ok=True)\\n"
            "open('out/output.bin', 'wb').write(data[::-1])\\n"
            "print('wrote', len(data))\\n")
        os.chdir(work)
        sess.upload(["main.py", "data/input.bin"])
        top = json.loads(sess.list_files(".")["files"])
        inner = json.loads(sess.list_files("data")["files"])
        report["list"] = [sorted(f["filename"] for f in top),
                          [(f["filename"], f["size"]) for f in inner]]

        res = run_to_end(sess, "", mode="batch",
                         opts={"clean": None, "build": "python3 -m py_compile main.py",
                               "exec": "python3 main.py"})
        report["batch"] = [[(r["status"], r["exitCode"]) for r in res
                            if r["status"] != "continued"], text(res, "stdout")]

        got = sess.download(["out/output.bin", "data/input.bin"], dest=str(work / "dl"))
        report["download"] = [
            sorted(got["file_names"]),
            (work / "dl" / "output.bin").read_bytes() == blob[::-1],
            (work / "dl" / "input.bin").read_bytes() == blob]

        stats = sess.destroy()
        report["destroy"] = sorted(stats["stats"])
        try:
            sess.get_info()
            report["after_destroy"] = "still there"
        except BackendAPIError as exc:
            report["after_destroy"] = exc.status
    print(json.dumps(report))
''')


@pytest.fixture(scope="module")
def sdk_report(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not SDK_PYTHON.exists():
        pytest.fail(f"The SDK venv is missing at {SDK_PYTHON}: run `make sdk-venv`.")
    tmp = tmp_path_factory.mktemp("sdk")
    script = tmp / "client.py"
    script.write_text(SCRIPT)
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "KB_"))}
    env.update(BACKEND_ENDPOINT=server.url, BACKEND_ENDPOINT_TYPE="api",
               BACKEND_ACCESS_KEY=server.access_key, BACKEND_SECRET_KEY=server.secret_key)
    out = subprocess.run([str(SDK_PYTHON), str(script), str(work)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def test_sdk_session_flow(sdk_report: dict[str, Any]) -> None:
    r = sdk_report
    assert r["sdk_version"] == "23.09.10"  # the pinned real client, not a stand-in
    assert r["api_version"][0] == 5  # negotiated from GET /: the v5 /session routes
    assert r["same_session"] is True
    assert r["query"] == ["42\n", 0]
    statuses, stdout = r["continue"]
    assert stdout == "0\n1\n2\n" and statuses[-1] == "finished" and "continued" in statuses
    assert r["input"] == [["waiting-input", "finished"], "who? hi sdk\n"]
    assert r["info"][0] == "python" and r["info"][1] >= 3
    assert r["after_restart"] == "False\n"
    elapsed, interrupted = r["interrupt"]
    assert interrupted and elapsed < 15
    assert r["complete"]["result"]["status"] == "finished"
    assert "import" in r["complete"]["result"]["completions"]


def test_sdk_files_and_batch(sdk_report: dict[str, Any]) -> None:
    r = sdk_report
    top, inner = r["list"]
    assert {"main.py", "data"} <= set(top)
    assert inner == [["input.bin", 300_000]]
    marks, stdout = r["batch"]
    assert marks == [["build-finished", 0], ["finished", 0]]
    assert stdout == "wrote 300000\n"
    names, output_ok, input_ok = r["download"]
    assert names == ["input.bin", "output.bin"] and output_ok and input_ok
    assert "cpu_used" in r["destroy"] and "mem_max_bytes" in r["destroy"]
    assert r["after_destroy"] == 404

