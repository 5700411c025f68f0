"""Start the real server on a free port, as a separate process, and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
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
        stop(proc)
        logf.close()
        if proc.stdout is not None:
            proc.stdout.close()
        if tmp is not None:
            unmount_leftovers(data_dir)
            tmp.cleanup()
        else:  # the caller's dir: a next server may sweep it (conftest unmounts what is left)
            USED_DATA_DIRS.add(data_dir)


USED_DATA_DIRS: set[Path] = set()


def stop(proc: subprocess.Popen[Any], grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def jupyter_app(module: str, server: Server, home: Path, root: Path, *args: str,
                ready_s: float = 60) -> Iterator[tuple[str, str, Path]]:
    """A Jupyter application (``module``: jupyter_server, jupyterlab) on a free port, whose
    kernels come from ``server`` through its gateway client; its config, data and runtime
    dirs and its log under ``home``, its files under ``root``. Yields (url, token, log)."""
    token = secrets.token_hex(16)
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log_path = home / f"{module}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--GatewayClient.url={server.url}", f"--GatewayClient.auth_token={server.secret_key}",
         "--GatewayClient.request_timeout=60", *args,
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if requests.get(url + "/api/status", params={"token": token},
                                timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        yield url, token, log_path
    finally:
        stop(proc)
        log.close()


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


def create_session(api: Client, prefix: str = "s", lang: str = "python", **body: Any) -> str:
    """A Backend.AI session named ``prefix-<random>`` (201, or the test fails); its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    r = api.post("/session", json={"lang": lang, "name": name, **body})
    assert r.status_code == 201, r.text
    return name


def console_text(results: list[dict[str, Any]], stream: str) -> str:
    return "".join(v for r in results for k, v in r["console"] if k == stream)
