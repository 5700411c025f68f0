"""Start the real server on a free port, as a separate process, and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    port: int
    data_dir: Path
    access_key: str
    secret_key: str
    process: subprocess.Popen[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # the KB_* settings it was started with

    def client(self, secret: str | None = None) -> Client:
        return Client(self.url, secret or self.secret_key)

    def new_keypair(self) -> tuple[str, str]:
        out = subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", "create", "--data-dir",
             str(self.data_dir), "--json"], capture_output=True, text=True, check=True, cwd=ROOT,
            env={**os.environ, **self.env})  # KB_DATABASE_URL: the key goes where it reads
        kp = json.loads(out.stdout)
        return kp["access_key"], kp["secret_key"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Client(requests.Session):
    """requests with the server's base URL and an X-API-Key."""

    def __init__(self, base: str, secret: str) -> None:
        super().__init__()
        self.base = base
        self.headers["X-API-Key"] = secret

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return super().request(method, self.base + str(url), *args, **kwargs)


@contextmanager
def run_server(data_dir: Path | None = None, **env: str) -> Iterator[Server]:
    """A real kernel-bridge process on a free port; settings through KB_* variables."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kb-test-")
        data_dir = Path(tmp.name) / "data"
    if os.environ.get("KB_TEST_DATABASE") == "postgres" and "database_url" not in env:
        from .pg import database_for  # every server of the run on PostgreSQL

        env = {**env, "database_url": database_for(data_dir)}
    port = free_port()
    log_path = data_dir.parent / f"server-{port}.log"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # A short shutdown grace: tests end servers with runs still going.
    settings = {f"KB_{k.upper()}": v for k, v in env.items()}
    environ = {**os.environ, "KB_FLUSH_INTERVAL": "2", "KB_SHUTDOWN_GRACE_S": "2", **settings}
    logf = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--data-dir",
         str(data_dir)], cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=logf, text=True)
    try:
        access = secret = ""
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited: {log_path.read_text()}")
            if line.startswith("{"):
                kp = json.loads(line)
                access, secret = kp["access_key"], kp["secret_key"]
            if "listening on" in line:
                break
        if not secret:  # a reused data dir: make a keypair to talk with
            out = subprocess.run(
                [sys.executable, "-m", "api.cli", "keys", "create", "--data-dir",
                 str(data_dir), "--json"], capture_output=True, text=True, check=True, cwd=ROOT,
                env=environ)
            kp = json.loads(out.stdout)
            access, secret = kp["access_key"], kp["secret_key"]
        yield Server(f"http://127.0.0.1:{port}", port, data_dir, access, secret, proc, log_path,
                     settings)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logf.close()
        if proc.stdout is not None:
            proc.stdout.close()
        if tmp is not None:
            unmount_leftovers(data_dir)
            tmp.cleanup()
        else:  # the caller's dir: a next server may sweep it (conftest unmounts what is left)
            USED_DATA_DIRS.add(data_dir)


USED_DATA_DIRS: set[Path] = set()


def unmount_leftovers(data_dir: Path) -> None:
    """Session and folder filesystems a killed server left mounted under its data dir (a
    clean stop unmounts them; tests/test_disk.py checks it): the shared machine keeps no
    loop device of ours."""
    from bridge.disk import mounted, umount

    real = os.path.realpath(data_dir) + os.sep
    for point in sorted(mounted(), key=len, reverse=True):
        if point.startswith(real):
            umount(point)


def run_to_end(client: Client, prefix: str, session: str, code: str, mode: str = "query",
               options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Drive one Backend.AI run through continue calls; returns every result seen."""
    results = []
    body: dict[str, Any] = {"mode": mode, "code": code, "runId": None}
    if options is not None:
        body["options"] = options
    for _ in range(200):
        r = client.post(f"{prefix}/{session}", json=body)
        assert r.status_code == 200, r.text
        result = r.json()["result"]
        results.append(result)
        if result["status"] in ("finished", "exec-timeout"):
            return results
        if result["status"] == "waiting-input":
            raise AssertionError(f"unexpected input request: {result}")
        body = {"mode": "continue", "code": "", "runId": result["runId"]}
    raise AssertionError("run did not finish")


def console_text(results: list[dict[str, Any]], stream: str) -> str:
    return "".join(v for r in results for k, v in r["console"] if k == stream)
