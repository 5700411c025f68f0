"""The README's Quick start, run as written against a real server (the port is the only change:
tests share the machine, so the server listens on a free port instead of 8002)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import requests

from .support import ROOT, run_server

README = (ROOT / "README.md").read_text()


def quick_start_blocks() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def json_values(text: str) -> tuple[list[Any], str]:
    """The JSON documents printed one after another (curl adds no newline), and the rest."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values, text[pos:]
        values.append(value)


def test_quick_start_as_written(tmp_path: Path) -> None:
    blocks = quick_start_blocks()
    assert [b.strip() for b in blocks[:1]] == ["make run"]  # terminal 1
    terminal2 = blocks[1]
    assert "/api/openapi.json" in README and "/api/docs" in README
    with run_server(data_dir=tmp_path / "data") as srv:
        script = terminal2.replace("127.0.0.1:8002", f"127.0.0.1:{srv.port}")
        env = {**os.environ, "KB_DATA_DIR": str(srv.data_dir)}
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        values, rest = json_values(out.stdout)
        hello, one_shot, created, first, second, destroyed = values
        assert hello["version"] == "v5.20191215"
        assert one_shot["stdout"] == "42\n" and one_shot["exit_code"] == 0
        assert created["sessionName"] == "demo" and created["created"] is True
        assert first["result"]["status"] == "finished"
        assert second["result"]["console"] == [["stdout", "42\n"]]
        assert "stats" in destroyed
        assert len([line for line in rest.splitlines() if line.startswith("AKIA")]) == 2
        # the cleanup left nothing behind
        r = requests.get(srv.url + "/session/demo", headers={"X-API-Key": srv.secret_key},
                         timeout=10)
        assert r.status_code == 404
