"""Process lifecycle: run() → serve() → startup, wait for a signal, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys

from tornado.httpserver import HTTPServer

from bridge.service import Bridge
from bridge.settings import Settings

from .app import make_app

log = logging.getLogger("kernel_bridge")


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    bridge = Bridge(settings)
    if not bridge.sandbox.enabled:
        log.warning("SANDBOX OFF: kernels run unconfined with the server's rights. "
                    "Never expose this server to untrusted code.")
    started = await bridge.start()
    log.info("sandbox: %s", bridge.sandbox.describe())
    if bridge.sandbox.enabled and not bridge.sandbox.cgroups.enabled:
        log.warning("No writable cgroup: memory is capped by RLIMIT_AS only and there is no "
                    "process cap (a fork bomb in a session can exhaust the machine).")
    if started.first_keypair is not None:
        kp = started.first_keypair
        # Shown once: the secret is not printed again.
        print("Created the first keypair (save it; it is shown only once):", flush=True)
        print(json.dumps({"access_key": kp.access_key, "secret_key": kp.secret_key}),
              flush=True)
    else:
        # Secrets are shown once, at the first start: say how to get one now.
        print(f"{len(bridge.keypairs.all())} keypair(s) in {settings.data_dir}. Lost the "
              "secret key? Make another: kernel-bridge keys create --data-dir "
              f"{settings.data_dir} --json", flush=True)
    server = HTTPServer(make_app(bridge), xheaders=False, max_body_size=64 * 1024 * 1024)
    sockets = bind(settings.host, settings.port)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    print(f"kernel-bridge listening on http://{settings.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        server.stop()
        await asyncio.wait_for(server.close_all_connections(), timeout=5)
        await bridge.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def bind(host: str, port: int) -> list[socket.socket]:
    from tornado.netutil import bind_sockets

    return bind_sockets(port, address=host)


def run(settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
    return 0
