"""The kb-bash kernel through jupyter_client: exit codes, streams, state, stdin, interrupt."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jupyter_kernel_test
import pytest

from kernelspecs._stdin import pipe_identity, waiting_threads

if TYPE_CHECKING:
    from conftest import KernelDriver

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found on PATH")


def _waiters(code: str, within: float) -> list[tuple[int, int]]:
    """Threads of ``python -c code`` seen waiting on its stdin pipe within ``within`` s."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        target = pipe_identity(proc.stdin.fileno())
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = waiting_threads(proc.pid, target)
            if found:
                return found
            time.sleep(0.02)
        return []
    finally:
        proc.kill()
        proc.wait()


def test_detector_sees_a_reader_thread_but_not_a_sleeper() -> None:
    # The main thread sits in futex/join; only a /proc/<pid>/task scan finds the reader.
    threaded = (
        "import sys, threading; t = threading.Thread(target=sys.stdin.read); t.start(); t.join()"
    )
    found = _waiters(threaded, within=5)
    assert found and all(tid != pid for pid, tid in found)
    assert _waiters("import time; time.sleep(5)", within=0.5) == []


@pytest.fixture
def bash(start_kernel: Callable[[str], KernelDriver]) -> Iterator[KernelDriver]:
    yield start_kernel("kb-bash")


def test_stdout_and_stderr_stay_apart(bash: KernelDriver) -> None:
    cell = bash.run("echo out; echo err >&2; echo out2")
    assert cell.text("stdout") == "out\nout2\n"
    assert cell.text("stderr") == "err\n"
    assert cell.reply["status"] == "ok"
    assert cell.exit_code == 0
    assert cell.errors == []


@pytest.mark.parametrize(
    ("code", "exit_code", "stdout"),
    [
        ("false; echo x; exit 3", 3, "x\n"),
        ("true; false", 1, ""),
        ("(exit 7)", 7, ""),
        ("kill -TERM $$", 143, ""),
        ("no_such_command_kb", 127, ""),
    ],
)
def test_exact_exit_code(bash: KernelDriver, code: str, exit_code: int, stdout: str) -> None:
    cell = bash.run(code)
    assert cell.exit_code == exit_code
    assert cell.reply["status"] == "error"
    assert (cell.reply["ename"], cell.reply["evalue"]) == ("ExitCode", str(exit_code))
    assert cell.reply["traceback"] == []
    assert cell.errors == [{"ename": "ExitCode", "evalue": str(exit_code), "traceback": []}]
    assert cell.text("stdout") == stdout
    # The exit itself adds no text; only bash's own complaint may appear.
    assert "ExitCode" not in cell.text("stderr")


def test_exit_does_not_kill_the_kernel(bash: KernelDriver) -> None:
    assert bash.run("X=1; exit 3").exit_code == 3
    cell = bash.run("echo alive $X")
    assert cell.text("stdout") == "alive 1\n"


def test_state_is_kept_between_cells(bash: KernelDriver, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    bash.run("A='two words'; export B=b; declare -a ARR=(1 '2 3'); f() { echo \"f:$1\"; }; cd sub")
    cell = bash.run("echo \"$A|$B|${ARR[1]}\"; f x; pwd; bash -c 'echo child:$B'")
    assert cell.text("stdout") == f"two words|b|2 3\nf:x\n{tmp_path / 'sub'}\nchild:b\n"
    bash.run("unset B HOME")
    assert bash.run('echo "[${B-unset}][${HOME-unset}]"').text("stdout") == "[unset][unset]\n"


def test_read_is_answered_through_input_request(bash: KernelDriver) -> None:
    cell = bash.run('printf "name? "; read name; echo "hi $name"', answers=["ada"])
    assert len(cell.input_requests) == 1
    assert cell.input_requests[0]["password"] is False
    assert cell.text("stdout") == "name? hi ada\n"
    # The prompt is streamed before the input_request goes out.
    assert cell.streams[0] == ("stdout", "name? ")


def test_stdin_reads_in_grandchildren_and_twice(bash: KernelDriver) -> None:
    code = 'read a; python3 -c \'print("py:" + input())\'; read b; echo "$a $b"'
    cell = bash.run(code, answers=["1", "2", "3"])
    assert len(cell.input_requests) == 3
    assert cell.text("stdout") == "py:2\n1 3\n"


def test_without_allow_stdin_read_sees_eof(bash: KernelDriver) -> None:
    cell = bash.run('read x; echo "rc=$? [$x]"')
    assert cell.text("stdout") == "rc=1 []\n"
    assert cell.input_requests == []


def test_interrupt_is_fast_and_kernel_stays_usable(bash: KernelDriver) -> None:
    cell = bash.run("echo start; sleep 30 & sleep 30; echo never", interrupt_after=0.5)
    assert cell.seconds < 3
    assert cell.reply["status"] == "error"
    assert cell.reply["interrupted"] is True
    assert cell.exit_code == 130
    assert cell.text("stdout") == "start\n"
    assert bash.run("echo ok").text("stdout") == "ok\n"


def test_interrupt_while_waiting_for_input(bash: KernelDriver) -> None:
    # No answer is ever given: the interrupt must end the cell anyway.
    drv = bash
    msg_id = drv.kc.execute("read x", allow_stdin=True)
    drv.kc.get_stdin_msg(timeout=10)
    drv.km.interrupt_kernel()
    reply = drv.reply_to(msg_id, 10)
    assert reply["content"]["interrupted"] is True
    assert drv.run("echo ok").text("stdout") == "ok\n"


def test_failed_cell_aborts_only_the_cells_queued_behind_it(bash: KernelDriver) -> None:
    # stop_on_error (the default): a cell already queued behind a failing one is aborted...
    kc = bash.kc
    failing = kc.execute("sleep 0.5; exit 3")
    queued = kc.execute("echo queued")
    assert bash.reply_to(failing, 10)["content"]["exit_code"] == 3
    assert bash.reply_to(queued, 10)["content"]["status"] == "aborted"
    # ...but one sent after the error reply arrived runs. ipykernel 7 alone ends the abort
    # window after sending the reply, so a quick client lost its next cell now and then:
    # several rounds make that race show.
    for _ in range(15):
        failing = kc.execute("exit 3")
        assert bash.reply_to(failing, 10)["content"]["exit_code"] == 3
        assert bash.run("echo ok").text("stdout") == "ok\n"


def test_completion(bash: KernelDriver, tmp_path: Path) -> None:
    (tmp_path / "datafile.txt").write_text("")
    reply = bash.kc.complete("ech", 3, reply=True, timeout=10)["content"]
    assert "echo" in reply["matches"]
    assert (reply["cursor_start"], reply["cursor_end"]) == (0, 3)
    reply = bash.kc.complete("cat data", 8, reply=True, timeout=10)["content"]
    assert reply["matches"] == ["datafile.txt"]
    assert reply["cursor_start"] == 4


@unittest.skipIf(shutil.which("bash") is None, "bash not found on PATH")
class BashKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "kb-bash"
    language_name = "bash"
    file_extension = ".sh"
    code_hello_world = "echo 'hello, world'"
    code_stderr = "echo oops >&2"
    code_generate_error = "exit 2"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "ech"}]
    complete_code_samples: ClassVar[list[str]] = ["echo hi", "for i in 1; do echo $i; done"]
    incomplete_code_samples: ClassVar[list[str]] = ["for i in 1; do", "if true; then"]
    invalid_code_samples: ClassVar[list[str]] = ["fi", "echo )"]
