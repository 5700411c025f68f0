"""Every language through the real server: a Backend.AI query, a batch run with "*", and
POST /api/v1/execute; an error gives its message and a non-zero exit code (issue 4)."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass

import pytest

from bridge.languages import resolve

from .support import Client, console_text, run_to_end


@dataclass(frozen=True)
class Sample:
    lang: str
    hello: str  # prints "hello from <lang>"
    main_file: str  # the "*" batch defaults look for this file
    error: str  # fails with a message containing `error_text`
    error_text: str
    error_exit: int = 1  # its exit code: an uncaught error's 1, a compiler's (go build: 2)


SAMPLES = [
    Sample("python", "print('hello from python')", "main.py",
           "raise ValueError('boom')", "ValueError"),
    Sample("javascript", "console.log('hello from javascript')", "main.js",
           "throw new Error('boom')", "boom"),
    Sample("c", '#include <stdio.h>\nint main(void) { printf("hello from c\\n"); return 0; }',
           "main.c", "int main(void) { return undefined_name; }", "undefined_name"),
    Sample("cpp", '#include <iostream>\nint main() { std::cout << "hello from cpp" << std::endl; }',
           "main.cpp", "int main() { undefined_name(); }", "undefined_name"),
    Sample("go", 'package main\nimport "fmt"\nfunc main() { fmt.Println("hello from go") }',
           "main.go", "package main\nfunc main() { undefinedName() }", "undefinedName", 2),
    Sample("rust", 'fn main() { println!("hello from rust"); }', "main.rs",
           "fn main() { undefined_name(); }", "undefined_name"),
    Sample("java", 'public class Main { public static void main(String[] a) {'
           ' System.out.println("hello from java"); } }', "Main.java",
           "public class Main { public static void main(String[] a) { undefinedName(); } }",
           "undefinedName"),
    Sample("ruby", "puts 'hello from ruby'", "main.rb", "raise 'boom'", "boom"),
    Sample("bash", "echo hello from bash", "main.sh", "echo boom >&2; exit 4", "boom", 4),
]


def available(lang: str) -> bool:
    return all(shutil.which(tool) for tool in resolve(lang).toolchain)


def require(lang: str) -> None:
    """A missing toolchain fails the test: `make test` installs every one (make toolchains), so
    a skip here would only hide a language the server cannot run."""
    if not available(lang):
        pytest.fail(f"{lang} toolchain not installed ({', '.join(resolve(lang).toolchain)}): "
                    "run `make toolchains`")


@pytest.fixture(params=SAMPLES, ids=[s.lang for s in SAMPLES])
def sample(request: pytest.FixtureRequest) -> Sample:
    s: Sample = request.param
    require(s.lang)
    return s


def test_query_batch_and_error_through_backendai(client: Client, sample: Sample) -> None:
    name = f"lang-{uuid.uuid4().hex[:10]}"
    assert client.post("/session", json={"lang": sample.lang, "name": name}).status_code == 201
    try:
        results = run_to_end(client, "/session", name, sample.hello)
        assert console_text(results, "stdout") == f"hello from {sample.lang}\n"
        assert results[-1]["exitCode"] == 0

        r = client.post(f"/session/{name}/upload", files=[
            ("src", (sample.main_file, sample.hello.encode(), "application/octet-stream"))])
        assert r.status_code == 204
        results = run_to_end(client, "/session", name, "", mode="batch",
                             options={"build": "*", "exec": "*"})
        statuses = [(r["status"], r["exitCode"]) for r in results if r["status"] != "continued"]
        assert statuses == [("build-finished", 0), ("finished", 0)], results
        assert f"hello from {sample.lang}\n" in console_text(results, "stdout")

        results = run_to_end(client, "/session", name, sample.error)
        assert sample.error_text in console_text(results, "stderr")
        # ipykernel is a global-context kernel: a query ends 0 whatever it raised (seed 002)
        expected = 0 if sample.lang == "python" else sample.error_exit
        assert results[-1]["exitCode"] == expected, results[-1]
    finally:
        client.delete(f"/session/{name}")


COMPILED = {"c", "cpp", "go", "rust", "java"}


def test_hello_and_error_through_execute_api(client: Client, sample: Sample) -> None:
    r = client.post("/api/v1/execute", json={"language": sample.lang, "code": sample.hello})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stdout"] == f"hello from {sample.lang}\n"
    assert body["exit_code"] == 0 and body["language"] == sample.lang
    r = client.post("/api/v1/execute", json={"language": sample.lang, "code": sample.error})
    body = r.json()
    assert body["exit_code"] == sample.error_exit, body
    if sample.lang in COMPILED:  # compiler messages apart from the program's (API.md, Piston)
        assert body["reason"] == "compile_error", body
        assert sample.error_text in body["compile_stderr"] and body["stderr"] == ""
    else:
        assert sample.error_text in body["stderr"]
        assert body["compile_stderr"] is None


READS_A_LINE = {
    "python": "name = input('name? ')\nprint('hi', name)",
    "ruby": 'print "name? "\nname = gets.chomp\nputs "hi #{name}"',
    "c": '#include <stdio.h>\nint main(void) { char s[64]; printf("name? ");'
         ' if (scanf("%63s", s) != 1) return 1; printf("hi %s\\n", s); return 0; }',
    # (read -p prints its prompt only when stdin is a terminal, as in bash itself)
    "bash": 'printf "name? "; read name; echo "hi $name"',
}


@pytest.mark.parametrize("lang", sorted(READS_A_LINE))
def test_waiting_input_with_its_prompt(client: Client, lang: str) -> None:
    require(lang)
    name = f"in-{uuid.uuid4().hex[:10]}"
    assert client.post("/session", json={"lang": lang, "name": name}).status_code == 201
    try:
        r = client.post(f"/session/{name}", json={"mode": "query", "runId": None,
                                                   "code": READS_A_LINE[lang]}).json()["result"]
        while r["status"] == "continued":
            r = client.post(f"/session/{name}", json={"mode": "continue", "code": "",
                                                       "runId": r["runId"]}).json()["result"]
        assert r["status"] == "waiting-input", r
        assert console_text([r], "stdout") + console_text([r], "stderr") == "name? "
        r = client.post(f"/session/{name}", json={"mode": "input", "code": "Ada",
                                                   "runId": r["runId"]}).json()["result"]
        results = [r]
        while results[-1]["status"] == "continued":
            results.append(client.post(f"/session/{name}", json={
                "mode": "continue", "code": "", "runId": r["runId"]}).json()["result"])
        assert results[-1]["status"] == "finished"
        assert console_text(results, "stdout").endswith("hi Ada\n")
    finally:
        client.delete(f"/session/{name}")
