"""The command line: kernelspecs install, keys, and serve's refusal of bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .support import ROOT


def kb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=60)


def test_kernelspecs_install_is_seen_by_jupyter(tmp_path: Path) -> None:
    out = kb("kernelspecs", "install", "--prefix", str(tmp_path))
    assert out.returncode == 0, out.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
        env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
        capture_output=True, text=True, check=True)
    specs = json.loads(listing.stdout)["kernelspecs"]
    for name in ("kb-python", "kb-bash", "kb-c", "kb-javascript", "kb-ruby", "kb-java"):
        assert name in specs, sorted(specs)
        argv = specs[name]["spec"]["argv"]
        assert argv[0] == sys.executable  # a Jupyter elsewhere starts them with our Python
        assert specs[name]["spec"]["interrupt_mode"] == "message"


def test_keys_create_and_list(tmp_path: Path) -> None:
    made = json.loads(kb("keys", "create", "--data-dir", str(tmp_path), "--json").stdout)
    assert set(made) == {"access_key", "secret_key"}
    listed = json.loads(kb("keys", "list", "--data-dir", str(tmp_path), "--json").stdout)
    assert [k["accessKey"] for k in listed] == [made["access_key"]]
    assert listed[0]["isActive"] is True and listed[0]["concurrency"] == 5
    assert made["secret_key"] not in json.dumps(listed)  # secrets are shown once


def test_serve_refuses_a_bad_setting(tmp_path: Path) -> None:
    out = kb("serve", "--data-dir", str(tmp_path), env={"KB_FLUSH_INTERVAL": "soon"})
    assert out.returncode == 2
    assert "KB_FLUSH_INTERVAL='soon'" in out.stderr
