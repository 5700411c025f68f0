"""Batch mode (clean → build → exec) through the real server and the session's bash kernel."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .support import Client, console_text, run_to_end

MAIN_C = b"""#include <stdio.h>
int twice(int x);
int main(void) {
    printf("twice(21) = %d\\n", twice(21));
    fprintf(stderr, "leaving with 3\\n");
    return 3;
}
"""
UTIL_C = b"int twice(int x) { return 2 * x; }\n"


def marks(results: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    return [(r["status"], r["exitCode"]) for r in results if r["status"] != "continued"]


def upload(client: Client, session: str, files: dict[str, bytes]) -> None:
    parts = [("src", (name, data, "application/octet-stream")) for name, data in files.items()]
    r = client.post(f"/session/{session}/upload", files=parts)
    assert r.status_code == 204, r.text


def new_session(client: Client, lang: str) -> str:
    name = f"b-{uuid.uuid4().hex[:10]}"
    r = client.post("/session", json={"lang": lang, "name": name})
    assert r.status_code == 201, r.text
    return name


@pytest.fixture(scope="module")
def c_session(server: Any) -> Iterator[tuple[Client, str]]:
    with server.client() as client:
        name = new_session(client, "c")
        yield client, name
        client.delete(f"/session/{name}")


def test_two_file_c_program_with_star_defaults(c_session: tuple[Client, str]) -> None:
    client, s = c_session
    # The SDK percent-encodes the '/' of a path in the part's filename.
    # a space in a directory name, and a hidden dir whose junk must not be compiled
    upload(client, s, {"main.c": MAIN_C, "lib%20dir%2Futil.c": UTIL_C,
                       ".cache%2Fjunk.c": b"not C at all\n"})
    results = run_to_end(client, "/session", s, "", mode="batch",
                         options={"clean": "*", "build": "*", "exec": "*"})
    # clean "*" for C does nothing without a Makefile; build "*" compiles every *.c into ./main
    assert marks(results) == [("clean-finished", 0), ("build-finished", 0), ("finished", 3)]
    assert console_text(results, "stdout") == "twice(21) = 42\n"
    assert console_text(results, "stderr") == "leaving with 3\n"
    # the exec output comes after build-finished, in the same run
    statuses = [r["status"] for r in results]
    assert len({r["runId"] for r in results}) == 1
    assert statuses.index("build-finished") < statuses.index("finished")


def test_syntax_error_fails_the_build_and_exec_gets_127(c_session: tuple[Client, str]) -> None:
    client, s = c_session
    upload(client, s, {"broken/broken.c": b"int main(void) { return 0 }\n"})
    results = run_to_end(client, "/session", s, "", mode="batch",
                         options={"build": "gcc -o broken/app broken/broken.c",
                                  "exec": "echo never ran"})
    (build_status, build_code), (final_status, final_code) = marks(results)
    assert build_status == "build-finished" and build_code != 0
    assert (final_status, final_code) == ("finished", 127)
    err = console_text(results, "stderr")
    assert "broken.c" in err and "error: expected" in err
    assert "never ran" not in console_text(results, "stdout")


def test_clean_step_and_build_only(c_session: tuple[Client, str]) -> None:
    client, s = c_session
    results = run_to_end(client, "/session", s, "", mode="batch", options={
        "clean": "rm -rf out; echo cleaned; exit 4",
        "build": "mkdir -p out && echo built > out/flag && cat out/flag", "exec": None})
    # no exec: only the build runs, and the run finishes with 0
    assert marks(results) == [("clean-finished", 4), ("build-finished", 0), ("finished", 0)]
    assert console_text(results, "stdout") == "cleaned\nbuilt\n"


def test_makefile_wins_over_the_default_build(client: Client) -> None:
    s = new_session(client, "c")
    try:
        upload(client, s, {
            "Makefile": b"main: main.c util.c\n\t@echo made by make\n"
                        b"\tgcc -DGREETING=7 -o main main.c util.c\n",
            "main.c": b"#include <stdio.h>\nint twice(int);\n"
                      b"int main(void){printf(\"%d\\n\", twice(GREETING)); return 0;}\n",
            "util.c": UTIL_C})
        results = run_to_end(client, "/session", s, "", mode="batch",
                             options={"build": "*", "exec": "*"})
        assert marks(results) == [("build-finished", 0), ("finished", 0)]
        assert console_text(results, "stdout").startswith("made by make\n")
        assert console_text(results, "stdout").endswith("14\n")
    finally:
        client.delete(f"/session/{s}")


def test_exec_reads_stdin_through_waiting_input(c_session: tuple[Client, str]) -> None:
    client, s = c_session
    body: dict[str, Any] = {"mode": "batch", "code": "", "runId": None, "options": {
        "exec": "python3 -c \"n = input('name? '); print('hello', n)\"; echo done >&2"}}
    seen: list[dict[str, Any]] = []
    for _ in range(30):
        result = client.post(f"/session/{s}", json=body).json()["result"]
        seen.append(result)
        if result["status"] == "waiting-input":
            assert result["options"] == {"is_password": False}
            body = {"mode": "input", "code": "kb", "runId": result["runId"]}
        elif result["status"] == "finished":
            break
        else:
            body = {"mode": "continue", "code": "", "runId": result["runId"]}
    statuses = [r["status"] for r in seen]
    assert "waiting-input" in statuses and statuses[-1] == "finished"
    assert seen[-1]["exitCode"] == 0
    assert console_text(seen, "stdout") == "name? hello kb\n"
    assert console_text(seen, "stderr") == "done\n"


def test_bad_batch_options_are_400(c_session: tuple[Client, str]) -> None:
    client, s = c_session
    r = client.post(f"/session/{s}", json={"mode": "batch", "code": "", "options": {
        "build": ["gcc", "x.c"]}})
    assert r.status_code == 400
    assert r.json()["type"].endswith("/invalid-api-params")
    assert "options.build" in r.json()["msg"]
