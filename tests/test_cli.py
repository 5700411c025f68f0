"""The command line: kernelspecs install, keys, and serve's refusal of bad settings."""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def test_settings_errors_name_what_the_user_set(tmp_path: Path) -> None:
    out = kb("serve", "--data-dir", str(tmp_path), env={"KB_PORT": "abc"})
    assert out.returncode == 2 and "KB_PORT='abc'" in out.stderr, out.stderr
    out = kb("serve", "--data-dir", str(tmp_path), "--port", "70000")
    assert out.returncode == 2 and "--port=70000" in out.stderr, out.stderr


def test_version_and_help(tmp_path: Path) -> None:
    from api.cli import parser

    out = kb("--version")
    assert out.returncode == 0 and out.stdout.strip() == "kernel-bridge 0.1.0"
    top = kb("--help").stdout
    assert "`" not in top and "KB_*" in top
    for command in ("serve", "keys", "kernelspecs", "settings", "run"):
        assert command in top
    serve = kb("serve", "--help").stdout
    for text in ("--host", "127.0.0.1", "--port", "8002", "--data-dir",
                 "~/.local/share/kernel-bridge", "--no-sandbox"):
        assert text in serve, text
    keys = kb("keys", "--help").stdout
    for action in ("create", "list", "activate", "deactivate", "set-concurrency"):
        assert action in keys
    assert "--concurrency" in kb("keys", "create", "--help").stdout

    # every option and every command of every parser says what it does
    def walk(p: argparse.ArgumentParser, where: str) -> list[str]:
        missing = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{where} {choice.dest}")
                for sub_name, sub in action.choices.items():
                    missing += walk(sub, f"{where} {sub_name}")
            elif action.help is None:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(parser(), "kernel-bridge") == []


def test_settings_command_prints_every_setting() -> None:
    from bridge.settings import Settings

    out = kb("settings")
    assert out.returncode == 0
    for name in Settings.model_fields:
        assert f"`KB_{name.upper()}`" in out.stdout, name
    assert "| `KB_PORT` | `8002` |" in out.stdout


def test_first_start_prints_a_keypair_and_later_starts_a_hint(tmp_path: Path) -> None:
    from .support import free_port

    def start() -> list[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(free_port()),
             "--data-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "listening on" in line:
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            proc.stdout.close()
        return lines

    first = start()
    kp = json.loads(next(line for line in first if line.startswith("{")))
    assert set(kp) == {"access_key", "secret_key"}
    second = "".join(start())
    assert kp["secret_key"] not in second and "{" not in second
    assert f"kernel-bridge keys create --data-dir {tmp_path} --json" in second
