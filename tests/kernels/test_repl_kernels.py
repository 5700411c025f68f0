"""kb-javascript and kb-ruby through jupyter_client: state, streams, errors, exit, interrupt.

Kernels come from conftest's pool (its temporary JUPYTER_PATH, one kernel a language shared
by the module's tests) and run cells through its KernelDriver.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jupyter_kernel_test
import pytest

if TYPE_CHECKING:
    from conftest import KernelDriver, KernelPool

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "kernelspecs" / "specs"
RUNTIME = {"kb-javascript": "node", "kb-ruby": "ruby"}


def _needs(name: str) -> pytest.MarkDecorator:
    runtime = RUNTIME[name]
    return pytest.mark.skipif(shutil.which(runtime) is None, reason=f"{runtime} not found on PATH")


KERNELS = [pytest.param(name, marks=_needs(name)) for name in RUNTIME]


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest, kernel_pool: KernelPool) -> KernelDriver:
    """One kernel per language, shared by the module's tests (start-up costs ~1 s)."""
    name: str = request.param
    return kernel_pool[name]


def lang(kernel: KernelDriver) -> str:
    return "js" if kernel.km.kernel_name == "kb-javascript" else "rb"


CODE: dict[str, dict[str, str]] = {
    "hello": {"js": 'console.log("hello, world")', "rb": 'puts "hello, world"'},
    "stderr": {
        "js": 'console.error("oops"); console.warn("w")',
        "rb": '$stderr.puts "oops"; warn "w"',
    },
    "define": {
        "js": "let a = 1; const b = 2; function twice(n) { return 2 * n }",
        "rb": "a = 1; b = 2; def twice(n) = 2 * n",
    },
    "use": {"js": "twice(a + b)", "rb": "twice(a + b)"},
    "raise": {"js": 'throw new TypeError("bad thing")', "rb": 'raise ArgumentError, "bad thing"'},
    "exit3": {"js": 'console.log("bye"); process.exit(3)', "rb": 'puts "bye"; exit 3'},
    "stream": {
        "js": "for (let i = 0; i < 3; i++) { console.log(i); await new Promise(r => setTimeout(r, 400)) }",
        "rb": "3.times { |i| puts i; sleep 0.4 }",
    },
    "busy": {"js": "let n = 0; while (true) { n++ }", "rb": "n = 0; loop { n += 1 }"},
    "timer": {"js": "await new Promise(r => setTimeout(r, 60000))", "rb": "sleep 60"},
}


def test_hello_world(kernel: KernelDriver) -> None:
    cell = kernel.run(CODE["hello"][lang(kernel)])
    assert cell.text("stdout") == "hello, world\n"
    assert cell.reply["status"] == "ok"
    assert cell.reply["exit_code"] == 0
    assert cell.results == [] and cell.errors == []


def test_state_across_cells(kernel: KernelDriver) -> None:
    assert kernel.run(CODE["define"][lang(kernel)]).reply["status"] == "ok"
    cell = kernel.run(CODE["use"][lang(kernel)])
    assert cell.results == ["6"]
    assert cell.reply["exit_code"] == 0


def test_stderr_is_its_own_stream(kernel: KernelDriver) -> None:
    cell = kernel.run(CODE["stderr"][lang(kernel)])
    assert cell.text("stderr") == "oops\nw\n"
    assert cell.text("stdout") == ""
    assert cell.reply["exit_code"] == 0


def test_uncaught_error(kernel: KernelDriver) -> None:
    cell = kernel.run(CODE["raise"][lang(kernel)])
    ename = {"js": "TypeError", "rb": "ArgumentError"}[lang(kernel)]
    assert cell.reply["status"] == "error"
    assert cell.reply["exit_code"] == 1
    assert (cell.reply["ename"], cell.reply["evalue"]) == (ename, "bad thing")
    assert [(e["ename"], e["evalue"]) for e in cell.errors] == [(ename, "bad thing")]
    assert any("cell-" in line for line in cell.errors[0]["traceback"])
    assert cell.text("stderr") == ""


def test_exit_code_and_next_cell(kernel: KernelDriver) -> None:
    kernel.run("kept = 41" if lang(kernel) == "rb" else "var kept = 41")
    cell = kernel.run(CODE["exit3"][lang(kernel)])
    assert cell.text("stdout") == "bye\n"
    assert cell.reply["exit_code"] == 3
    assert cell.reply["status"] == "error"
    assert (cell.reply["ename"], cell.reply["evalue"]) == ("ExitCode", "3")
    after = kernel.run("1 + 1")
    assert after.results == ["2"] and after.reply["exit_code"] == 0
    if lang(kernel) == "js":
        # Node is gone, so is its state, and the user is told.
        assert "state" not in after.text("stderr")
        assert "restarted" in cell.text("stderr")
        assert kernel.run("typeof kept").results == ["'undefined'"]
    else:
        # Ruby's SystemExit is rescued in the host: state survives.
        assert kernel.run("kept + 1").results == ["42"]


def test_output_streams_while_cell_runs(kernel: KernelDriver) -> None:
    cell = kernel.run(CODE["stream"][lang(kernel)])
    lines = [(t, text) for t, (name, text) in zip(cell.arrivals, cell.streams, strict=True)
             if name == "stdout"]
    assert "".join(text for _, text in lines) == "0\n1\n2\n"
    assert cell.seconds >= 1.1
    # The first line arrived long before the cell ended, the rest spread out.
    assert lines[0][0] < cell.seconds - 0.7
    assert len(lines) == 3 and lines[2][0] - lines[0][0] >= 0.6


@pytest.mark.parametrize("code", ["busy", "timer"])
def test_interrupt_keeps_kernel_and_state(kernel: KernelDriver, code: str) -> None:
    kernel.run("kept_i = 7" if lang(kernel) == "rb" else "var kept_i = 7")
    cell = kernel.run(CODE[code][lang(kernel)], interrupt_after=0.7, timeout=20)
    assert cell.seconds < 5
    assert cell.reply["status"] == "error"
    assert cell.reply["exit_code"] == 130
    assert cell.reply.get("interrupted") is True
    assert len(cell.errors) == 1
    # The host honoured SIGINT, so nothing was restarted and state is intact.
    assert kernel.run("kept_i * 6").results == ["42"]
    if code == "busy":
        assert kernel.run("n > 0").results == ["true"]


@_needs("kb-javascript")
def test_js_specifics(kernel_pool: KernelPool) -> None:
    js = kernel_pool["kb-javascript"]
    # Re-running a cell that declares with let/const is fine (V8's REPL mode).
    assert js.run("let r = 1; const c = 2").reply["status"] == "ok"
    assert js.run("let r = 10; const c = 20").reply["status"] == "ok"
    assert js.run("r + c").results == ["30"]
    assert js.run("const z = await Promise.resolve(5); z * 2").results == ["10"]
    assert js.run("({a: 1, b: 'x'})").results == ["{ a: 1, b: 'x' }"]
    assert js.run("{a: 1}").results == ["{ a: 1 }"]
    rejected = js.run("Promise.reject(new RangeError('nope')); undefined")
    assert rejected.reply["exit_code"] == 1
    assert [e["ename"] for e in rejected.errors] == ["RangeError"]
    assert js.run("let s = (").reply["ename"] == "SyntaxError"
    assert js.run("require('path').join('a', 'b')").results == ["'a/b'"]
    clean_exit = js.run("process.exit(0)")
    assert clean_exit.reply["status"] == "ok" and clean_exit.reply["exit_code"] == 0


@pytest.mark.parametrize("name", KERNELS)
def test_missing_runtime_fails_clearly(name: str, tmp_path: Path) -> None:
    module = {"kb-javascript": "javascript_kernel", "kb-ruby": "ruby_kernel"}[name]
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", f"kernelspecs.{module}", "-f", str(tmp_path / "conn.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert f"'{RUNTIME[name]}' executable was not found" in proc.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node not found on PATH")
class JavaScriptConformance(jupyter_kernel_test.KernelTests):  # type: ignore[misc]
    kernel_name = "kb-javascript"
    language_name = "javascript"
    file_extension = ".js"
    code_hello_world = 'console.log("hello, world")'
    code_stderr = 'console.error("test")'
    code_generate_error = "null.boom"
    code_execute_result: ClassVar[list[dict[str, str]]] = [
        {"code": "6 * 7", "result": "42"},
        {"code": "'a' + 'b'", "result": "'ab'"},
    ]
    completion_samples: ClassVar[list[dict[str, Any]]] = [
        {"text": "conso", "matches": {"console"}},
        {"text": "console.tabl", "matches": {"table"}},
    ]


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not found on PATH")
class RubyConformance(jupyter_kernel_test.KernelTests):  # type: ignore[misc]
    kernel_name = "kb-ruby"
    language_name = "ruby"
    file_extension = ".rb"
    code_hello_world = 'puts "hello, world"'
    code_stderr = '$stderr.puts "test"'
    code_generate_error = "nil.boom"
    code_execute_result: ClassVar[list[dict[str, str]]] = [
        {"code": "6 * 7", "result": "42"},
        {"code": "'a' + 'b'", "result": '"ab"'},
    ]
    completion_samples: ClassVar[list[dict[str, Any]]] = [
        {"text": "$stdou", "matches": {"$stdout"}},
        {"text": "Intege", "matches": {"Integer"}},
    ]


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed")
def test_ruby_reads_stdin_through_input_requests(kernel_pool: KernelPool) -> None:
    kc = kernel_pool["kb-ruby"].kc
    code = ('print "name? "\nname = gets\nputs "hi #{name.chomp}"\n'
            "rest = $stdin.read\nputs rest.lines.size\np gets")
    msg_id = kc.execute(code, allow_stdin=True, stop_on_error=False)
    answers = ["Ada", "line 1", "line 2", "\x04"]  # then Ctrl-D: end of file
    prompts_seen_first = []
    streams: list[str] = []
    while answers:
        request = kc.get_stdin_msg(timeout=20)
        assert request["msg_type"] == "input_request"
        assert request["parent_header"]["msg_id"] == msg_id
        # the prompt printed before the read reached the frontend before the request
        while True:
            try:
                msg = kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                break
            if msg["msg_type"] == "stream":
                streams.append(msg["content"]["text"])
        prompts_seen_first.append("".join(streams))
        kc.input(answers.pop(0))
    while True:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["msg_type"] == "stream":
            streams.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" \
                and msg["parent_header"].get("msg_id") == msg_id:
            break
    assert prompts_seen_first[0] == "name? "
    assert "".join(streams) == "name? hi Ada\n2\nnil\n"
    # a client that allows no stdin: a read is end-of-file at once instead of a hang
    msg_id = kc.execute("p gets", allow_stdin=False)
    out = []
    while True:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert "".join(out) == "nil\n"
