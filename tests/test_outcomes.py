"""Why an execution ended (reason, signal), compile output apart, and cached builds of
compiled-language sessions, through the real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.languages import resolve

from .support import Client, Server, console_text, run_server, run_to_end


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # A small memory cap, so a runaway allocation meets the OOM killer quickly.
    with run_server(default_mem_kib=str(256 * 1024)) as srv:
        yield srv


@pytest.fixture()
def client(server: Server) -> Client:
    return server.client()


def execute(client: Client, language: str, code: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/v1/execute", json={"language": language, "code": code, **extra},
                    timeout=300)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_normal_run_completes(client: Client) -> None:
    body = execute(client, "python", "print('hi')")
    assert (body["reason"], body["signal"], body["exit_code"]) == ("completed", None, 0)
    assert body["compile_stdout"] is None and body["compile_stderr"] is None
    body = execute(client, "c", '#include <stdio.h>\nint main(void){ puts("hi"); return 0; }')
    assert (body["reason"], body["signal"], body["stdout"]) == ("completed", None, "hi\n")
    assert body["compile_stdout"] == "" and body["compile_stderr"] == ""


def test_runtime_error(client: Client) -> None:
    body = execute(client, "python", "raise KeyError('x')")
    assert (body["reason"], body["signal"], body["exit_code"]) == ("runtime_error", None, 1)
    body = execute(client, "c", "int main(void){ return 3; }")
    assert (body["reason"], body["signal"], body["exit_code"]) == ("runtime_error", None, 3)


def test_signals(client: Client) -> None:
    code = "#include <signal.h>\n#include <unistd.h>\nint main(void){ kill(getpid(), SIG%s); }"
    body = execute(client, "c", code % "SEGV")
    assert (body["reason"], body["signal"], body["exit_code"]) == ("runtime_error", 11, 139)
    body = execute(client, "c", code % "TERM")
    assert (body["reason"], body["signal"], body["exit_code"]) == ("killed", 15, 143)


def test_timeout(client: Client) -> None:
    body = execute(client, "python", "while True: pass", timeout=1)
    assert (body["reason"], body["signal"], body["exit_code"]) == ("timeout", None, -1)


def test_memory_kill(client: Client) -> None:
    # The program exceeds the 256 MiB cap: the OOM killer ends it, its kernel survives.
    code = ("#include <stdlib.h>\n#include <string.h>\n#include <stdio.h>\n"
            "int main(void){ size_t n = (size_t)1 << 30; char *p = malloc(n);"
            " memset(p, 1, n); printf(\"%d\\n\", p[n - 1]); return 0; }")
    body = execute(client, "c", code)
    assert (body["reason"], body["signal"]) == ("memory_limit", 9), body
    # Python allocates in its kernel's own process: the kernel is what the OOM killer ends.
    body = execute(client, "python", "x = b'x' * (1 << 30)")
    assert body["reason"] == "memory_limit", body


def test_compile_error_apart_from_run_output(client: Client) -> None:
    body = execute(client, "c", "int main(void) { return nope; }")
    assert body["reason"] == "compile_error" and body["exit_code"] != 0
    assert "nope" in body["compile_stderr"] and "error" in body["compile_stderr"]
    assert body["stderr"] == ""  # the run's stderr: nothing ran
    # A warning is compile output; what the program prints is the run's.
    body = execute(client, "c", '#include <stdio.h>\nint main(void){ int unused;'
                   ' fprintf(stderr, "run\\n"); return 0; }')
    assert "unused" in body["compile_stderr"]
    assert body["stderr"] == "run\n" and body["reason"] == "completed"


def test_backendai_c_session_compiles_once(client: Client) -> None:
    lang = resolve("c")
    if not lang.available:
        pytest.skip("gcc missing")
    prefix = "/session"
    r = client.post(prefix, json={"lang": "c", "name": "cached-c"})
    assert r.status_code == 201, r.text
    # -Wall warns about `unused`: the warning shows only when the compiler runs.
    code = ('#include <stdio.h>\n#include <sys/stat.h>\nint main(void){ int unused;'
            ' struct stat st; stat("/proc/self/exe", &st);'
            ' printf("%lu.%ld\\n", (unsigned long)st.st_ino, (long)st.st_mtim.tv_nsec);'
            ' return 0; }')
    seen = []
    for _ in range(2):
        started = time.monotonic()
        results = run_to_end(client, prefix, "cached-c", code)
        seen.append((time.monotonic() - started, console_text(results, "stdout"),
                     console_text(results, "stderr")))
    (_, first_out, first_err), (_, second_out, second_err) = seen
    assert "unused" in first_err  # compiled
    assert "unused" not in second_err  # not compiled again
    assert first_out == second_out  # the very same binary ran
    # A changed source is built anew.
    results = run_to_end(client, prefix, "cached-c", code.replace("unused", "unused2"))
    assert "unused2" in console_text(results, "stderr")
    assert console_text(results, "stdout") != first_out
    client.delete(f"{prefix}/cached-c")


def test_backendai_batch_build_reused_while_sources_unchanged(client: Client) -> None:
    r = client.post("/session", json={"lang": "c", "name": "cached-batch"})
    assert r.status_code == 201, r.text
    source = b'#include <stdio.h>\nint main(void){ int unused; puts("v1"); return 0; }\n'

    def upload(data: bytes) -> None:
        r = client.post("/session/cached-batch/upload", files=[("src", ("main.c", data))])
        assert r.status_code == 204, r.text

    def batch() -> tuple[str, str]:
        results = run_to_end(client, "/session", "cached-batch", "", mode="batch",
                             options={"build": "*", "exec": "*"})
        marks = [(x["status"], x["exitCode"]) for x in results if x["status"] != "continued"]
        assert marks == [("build-finished", 0), ("finished", 0)], results
        return console_text(results, "stdout"), console_text(results, "stderr")

    upload(source)
    out, err = batch()
    assert out == "v1\n" and "unused" in err  # compiled (with -Wall's warning)
    out, err = batch()
    assert out == "v1\n" and "unused" not in err and "reused" in err  # not compiled again
    upload(source.replace(b"v1", b"v2"))
    out, err = batch()
    assert out == "v2\n" and "unused" in err  # a changed source is built
    client.delete("/session/cached-batch")
