"""Process lifecycle: run() → serve() → startup, wait for a signal, shutdown.

Start-up order matters (uvicorn is the model): signal handlers first, so a signal during start-up
stops what has started; then the data dir's lock, so a second server refuses before it touches
anything; then the port, so a busy port is refused before any start-up cleanup; only then the
core, which sweeps what a dead server left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import sys

from tornado.httpserver import HTTPServer

from bridge import doctor
from bridge.datadir import DataDirLock
from bridge.errors import StartupRefused
from bridge.service import Bridge
from bridge.settings import Settings

from .app import make_app
from .logs import configure as configure_logging

log = logging.getLogger("kernel_bridge")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PortInUse(StartupRefused):
    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


class Signals:
    """The first signal asks for a graceful stop, the second for an immediate one."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Raises StartupRefused (one line for the operator)."""
    loop = asyncio.get_running_loop()
    signals = Signals()
    signals.install(loop)
    # SQLite: one server per data dir. PostgreSQL: replicas share it (bridge/datadir.py).
    lock = DataDirLock(settings.data_dir) if not settings.database_url else None
    try:
        if lock is not None:
            lock.acquire()
        sockets = bind(settings.host, settings.port)
        try:
            await _serve(settings, sockets, signals, ready)
        finally:
            for s in sockets:
                s.close()
    finally:
        if lock is not None:
            lock.release()
        signals.remove(loop)


async def _serve(settings: Settings, sockets: list[socket.socket], signals: Signals,
                 ready: asyncio.Event | None) -> None:
    bridge = Bridge(settings)
    if not bridge.sandbox.enabled:
        log.warning("SANDBOX OFF: kernels run unconfined with the server's rights. "
                    "Never expose this server to untrusted code.")
    # Other replicas reach this one here (KB_ADVERTISE_URL overrides it), recorded at start.
    bridge.replicas.listening(f"http://{settings.host}:{sockets[0].getsockname()[1]}")
    try:
        started = await bridge.start()
        log.info("sandbox: %s", bridge.sandbox.describe())
        if bridge.sandbox.enabled and not bridge.sandbox.cgroups.enabled:
            log.warning("No writable cgroup: memory is capped by RLIMIT_AS only and there is "
                        "no process cap (a fork bomb in a session can exhaust the machine).")
        if started.first_keypair is not None:
            kp = started.first_keypair
            # Shown once: the secret is not printed again.
            print("Created the first keypair (save it; it is shown only once):", flush=True)
            print(json.dumps({"access_key": kp.access_key, "secret_key": kp.secret_key}),
                  flush=True)
        else:
            # Secrets are shown once, at the first start: say how to get one now.
            where, how = (f"{settings.data_dir}", f"--data-dir {settings.data_dir}")
            if settings.database_url:  # the URL may hold a password: not printed
                where, how = bridge.store.describe(), "(with the same KB_DATABASE_URL)"
            print(f"{len(bridge.keypairs.all())} keypair(s) in {where}. Lost the secret key? "
                  f"Make another: kernel-bridge keys create {how} --json", flush=True)
        if signals.stop.is_set():  # a signal arrived during start-up
            return
        server = HTTPServer(make_app(bridge), xheaders=False, max_body_size=64 * 1024 * 1024)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        url = f"http://{settings.host}:{port}"
        print(f"kernel-bridge listening on {url} (API docs: {url}/api/docs; Ctrl-C stops it)",
              flush=True)
        if ready is not None:
            ready.set()
        await signals.stop.wait()
        log.info("shutting down: no new connections; waiting up to %.0f s for running runs",
                 settings.shutdown_grace_s)
        server.stop()
        await bridge.drain(settings.shutdown_grace_s, signals.hurry)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), timeout=5)
    finally:
        await bridge.stop()


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port. Raises PortInUse."""
    from tornado.netutil import bind_sockets

    try:
        return bind_sockets(port, address=host)
    except OSError as exc:
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise PortInUse(host, port, reason or str(exc)) from None


def run(settings: Settings, unsafe: bool = False) -> int:
    configure_logging(settings.log_format)
    if not preflight(settings, unsafe):
        return 2
    try:
        asyncio.run(serve(settings))
    except StartupRefused as exc:
        print(f"kernel-bridge: {exc}", file=sys.stderr)
        return 2
    return 0


def preflight(settings: Settings, unsafe: bool) -> bool:
    """``kernel-bridge doctor``'s checks (toolchain versions aside): False means do not start."""
    report = doctor.run(settings, versions=False)
    for check in report.checks:
        if check.verdict in ("warn", "skip"):
            log.warning("doctor: %s: %s%s", check.name, check.detail,
                        f" (fix: {check.fix})" if check.fix else "")
    failed = report.failures()
    if not failed:
        return True
    for check in failed:
        print(f"kernel-bridge: {check.name}: {check.detail}\n  fix: {check.fix}",
              file=sys.stderr, flush=True)
    if unsafe:
        log.warning("UNSAFE: starting despite %d failed check(s) (--unsafe)", len(failed))
        return True
    print("kernel-bridge: refusing to start (run `kernel-bridge doctor`; --unsafe starts "
          "anyway, --no-sandbox runs kernels unconfined)", file=sys.stderr, flush=True)
    return False

