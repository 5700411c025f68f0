"""Judge-style test cases through the real server: one build, one fresh process per case."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.languages import resolve

from .support import Client, Server, run_server

SUM_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
int main(void) {
    struct stat st;  /* which binary runs: the same file for every case of one build */
    stat("/proc/self/exe", &st);
    fprintf(stderr, "build %lu.%ld\n", (unsigned long)st.st_ino, (long)st.st_mtim.tv_nsec);
    long a, b;
    if (scanf("%ld %ld", &a, &b) != 2) return 2;
    if (a == -1) for (;;) {}
    if (a == -2) {
        size_t n = (size_t)512 << 20;
        char *p = malloc(n);
        memset(p, 1, n);
        printf("%d\n", p[n - 1]);
    }
    printf("%ld\n", a + b);
    return 0;
}
"""

SUM_PY = """
import sys
a, b = map(int, sys.stdin.read().split())
if a == -1:
    while True:
        pass
if a == -2:
    x = b"x" * (512 << 20)
if a == -3:
    raise ValueError("bad input")
print(a + b)
"""

SUM_GO = """
package main

import "fmt"

func main() {
	var a, b int64
	fmt.Scan(&a, &b)
	if a == -1 {
		for {
		}
	}
	if a == -2 {
		s := make([]byte, 512<<20)
		for i := range s {
			s[i] = 1
		}
		fmt.Println(s[len(s)-1])
	}
	fmt.Println(a + b)
}
"""

SUM_JAVA = """
import java.util.Scanner;

public class Main {
    public static void main(String[] args) {
        Scanner in = new Scanner(System.in);
        long a = in.nextLong(), b = in.nextLong();
        if (a == -1) { while (true) { } }
        if (a == -2) {
            byte[] s = new byte[512 << 20];
            java.util.Arrays.fill(s, (byte) 1);
            System.out.println(s[s.length - 1]);
        }
        System.out.println(a + b);
    }
}
"""

SLOW, HUGE = "-1 0", "-2 0"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_server() as srv:
        yield srv


@pytest.fixture()
def client(server: Server) -> Client:
    return server.client()


def needs(language: str) -> None:
    lang = resolve(language)
    if not lang.available:
        pytest.skip(f"{language} toolchain missing: {', '.join(lang.toolchain)}")


def judge(client: Client, language: str, code: str, cases: list[dict[str, Any]],
          **extra: Any) -> dict[str, Any]:
    r = client.post("/api/v1/execute", json={"language": language, "code": code,
                                             "test_cases": cases, **extra}, timeout=600)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert len(body["test_results"]) == len(cases)
    return body


def events(client: Client, execution_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    r = client.get(f"/api/v1/execute/{execution_id}/events")
    assert r.status_code == 200
    out = []
    for block in r.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return out


def sum_cases(right: int, wrong: int, *, timeout: float, memory_mb: int,
              slow_timeout: float = 1.0) -> tuple[list[dict[str, Any]], list[str]]:
    """``right`` + ``wrong`` sums, one that spins, one that allocates 512 MiB."""
    cases, want = [], []
    for i in range(right):
        cases.append({"stdin": f"{i} {i * 7}\n", "expected_output": f"{i * 8}\n",
                      "timeout": timeout, "memory_mb": memory_mb})
        want.append("accepted")
    for i in range(wrong):
        cases.append({"stdin": f"{i} 1", "expected_output": f"{i + 2}",
                      "timeout": timeout, "memory_mb": memory_mb})
        want.append("wrong_answer")
    cases.append({"stdin": SLOW, "expected_output": "-1", "timeout": slow_timeout,
                  "memory_mb": memory_mb})
    want.append("time_limit_exceeded")
    cases.append({"stdin": HUGE, "expected_output": "1\n-2", "timeout": timeout,
                  "memory_mb": memory_mb})
    want.append("memory_limit_exceeded")
    return cases, want


def check_sums(body: dict[str, Any], cases: list[dict[str, Any]], want: list[str]) -> None:
    results = body["test_results"]
    assert [r["status"] for r in results] == want
    for case, result, status in zip(cases, results, want, strict=True):
        assert isinstance(result["time_ms"], int) and result["time_ms"] >= 0
        assert isinstance(result["memory_kb"], int) and result["memory_kb"] > 0
        if status in ("accepted", "wrong_answer"):
            a, b = map(int, case["stdin"].split())
            assert result["stdout"].strip() == str(a + b)
            assert result["exit_code"] == 0 and result["signal"] is None
        else:  # killed by the judge: SIGKILL, reported as a shell would
            assert result["signal"] == 9 and result["exit_code"] == 137
    mle = results[want.index("memory_limit_exceeded")]
    assert mle["memory_kb"] > cases[-1]["memory_mb"] * 1024
    tle = results[want.index("time_limit_exceeded")]
    assert tle["time_ms"] > 0


def test_c_fifty_cases_one_build(client: Client) -> None:
    cases, want = sum_cases(45, 3, timeout=2, memory_mb=64)
    assert len(cases) == 50
    body = judge(client, "c", SUM_C, cases)
    check_sums(body, cases, want)
    assert body["reason"] == "completed" and body["exit_code"] == 0
    assert body["compile_stdout"] == "" and body["compile_stderr"] == ""
    # One build: every case ran the same binary file...
    builds = {r["stderr"] for r in body["test_results"]}
    assert len(builds) == 1 and builds.pop().startswith("build ")
    # ...and the stream says the compiler ran once.
    evs = events(client, body["execution_id"])
    assert [d for _, e, d in evs if d.get("status") == "judged"] == [{"status": "judged",
                                                                      "compiles": 1}]
    finished = [d for _, e, d in evs if d.get("status") == "case-finished"]
    assert [d["result"] for d in finished] == want
    assert [d["status"] for _, e, d in evs if e == "status"].count("build-finished") == 1


def test_python_cases(client: Client) -> None:
    cases, want = sum_cases(2, 1, timeout=5, memory_mb=128)
    cases.append({"stdin": "-3 0", "expected_output": "-3", "timeout": 5, "memory_mb": 128})
    want.append("runtime_error")
    cases.append({"stdin": "20 22", "timeout": 5, "memory_mb": 128})  # no expected output
    want.append("ok")
    body = judge(client, "python", SUM_PY, cases)
    assert [r["status"] for r in body["test_results"]] == want
    check_sums({"test_results": body["test_results"][:5]}, cases[:5], want[:5])
    assert "ValueError: bad input" in body["test_results"][5]["stderr"]
    assert body["test_results"][5]["exit_code"] == 1
    assert body["test_results"][6]["stdout"] == "42\n"
    # Interpreted: nothing was compiled.
    assert body["compile_stdout"] is None and body["compile_stderr"] is None
    assert body["reason"] == "completed"


def test_go_cases(client: Client) -> None:
    needs("go")
    cases, want = sum_cases(3, 1, timeout=5, memory_mb=128)
    check_sums(judge(client, "go", SUM_GO, cases), cases, want)


def test_java_cases(client: Client) -> None:
    needs("java")
    # A JVM spends about half a second of CPU starting; the spinning case gets 3 s.
    cases, want = sum_cases(2, 1, timeout=15, memory_mb=256, slow_timeout=3)
    check_sums(judge(client, "java", SUM_JAVA, cases), cases, want)


def test_compile_error_ends_every_case(client: Client) -> None:
    cases = [{"stdin": "1 2", "expected_output": "3"}] * 4
    body = judge(client, "c", "int main(void) { return missing; }\n", cases)
    assert [r["status"] for r in body["test_results"]] == ["compile_error"] * 4
    assert body["reason"] == "compile_error" and body["exit_code"] != 0
    assert "missing" in body["compile_stderr"] and "error" in body["compile_stderr"]
    assert body["stderr"] == body["compile_stderr"]  # the build's fields are the build's


def test_too_many_cases_is_422(client: Client) -> None:
    r = client.post("/api/v1/execute", json={"language": "c", "code": SUM_C,
                                             "test_cases": [{"stdin": "1 1"}] * 101})
    assert r.status_code == 422, r.text
    assert "test_cases" in r.json()["detail"]
    r = client.post("/api/v1/execute", json={"language": "c", "code": SUM_C,
                                             "test_cases": [{"stdin": "1 1", "timeout": 0}]})
    assert r.status_code == 422


def test_async_and_named_session_reuse_the_build(client: Client) -> None:
    cases = [{"stdin": "2 3", "expected_output": "5"}, {"stdin": "2 3", "expected_output": "6"}]
    ids = []
    for _ in range(2):
        r = client.post("/api/v1/execute/async", json={
            "language": "c", "code": SUM_C, "test_cases": cases, "session_id": "judge-c"})
        assert r.status_code == 200 and r.json()["status"] == "pending"
        ids.append(r.json()["execution_id"])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = client.get(f"/api/v1/execute/status/{ids[-1]}").json()
            if status["status"] in ("completed", "failed"):
                break
            time.sleep(0.3)
        assert status["status"] == "completed", status
        results = status["result"]["test_results"]
        assert [r["status"] for r in results] == ["accepted", "wrong_answer"]
    # The named session keeps its build: the second execution compiled nothing.
    cached = [[d.get("cached") for _, e, d in events(client, i)
               if d.get("status") == "build-finished"] for i in ids]
    assert cached == [[False], [True]]


@pytest.mark.parametrize(("language", "code"), [
    ("javascript", "const [a, b] = require('fs').readFileSync(0, 'utf8').trim().split(/\\s+/)"
                   ".map(Number);\nconsole.log(a + b);"),
    ("ruby", "a, b = $stdin.read.split.map(&:to_i)\nputs a + b"),
    ("bash", "read a b\necho $((a + b))"),
])
def test_other_interpreted_languages(client: Client, language: str, code: str) -> None:
    needs(language)
    cases = [{"stdin": "2 3\n", "expected_output": "5"}, {"stdin": "2 3\n", "expected_output": "6"},
             {"stdin": "40 2\n"}]
    body = judge(client, language, code, cases)
    assert [r["status"] for r in body["test_results"]] == ["accepted", "wrong_answer", "ok"]
    assert body["test_results"][2]["stdout"] == "42\n"
    assert all(r["memory_kb"] > 0 for r in body["test_results"])
