"""The real Backend.AI command line (`backend.ai run`, SDK 23.9.10): it creates a session over
REST, uploads the files, and streams the run over the WebSocket execute endpoint."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .support import SDK_PYTHON, Server

MAIN_C = r"""#include <stdio.h>
int main(void) {
    int x;
    printf("num? ");
    fflush(stdout);
    if (scanf("%d", &x) != 1) return 9;
    printf("got %d\n", x * 2);
    return 3;
}
"""


def cli(server: Server, cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKEND_ENDPOINT": server.url, "BACKEND_ENDPOINT_TYPE": "api",
           "BACKEND_ACCESS_KEY": server.access_key, "BACKEND_SECRET_KEY": server.secret_key}
    return subprocess.run([str(SDK_PYTHON.parent / "backend.ai"), *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_cli_runs_a_query(server: Server, tmp_path: Path) -> None:
    out = cli(server, tmp_path, "run", "--rm", "python", "-c", "print(6 * 7)")
    assert "42\n" in out.stdout, out
    assert "Execution finished. (exit code = 0)" in out.stdout + out.stderr


def test_cli_builds_and_runs_a_c_program_with_input(server: Server, tmp_path: Path) -> None:
    (tmp_path / "main.c").write_text(MAIN_C)
    out = cli(server, tmp_path, "run", "--rm", "c", "main.c", stdin="21\n")
    text = out.stdout + out.stderr
    assert "Build finished. (exit code = 0)" in text, text
    assert "num? got 42" in out.stdout
    assert "Execution finished. (exit code = 3)" in text
