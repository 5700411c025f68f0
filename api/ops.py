"""Operations routes: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (may take work).

``/healthz`` and ``/readyz`` never ask for credentials (load balancers and probes have none) and
say nothing a stranger could use. ``/metrics`` asks for a key per ``KB_METRICS_AUTH``: with the
default ``auto``, only when the server listens beyond loopback.
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge import metrics
from bridge.health import Health

from .auth import authenticate
from .backendai.errors import BACKENDAI
from .base import BaseHandler
from .dialect import Dialect
from .openapi import Operation

# Error bodies in the root dialect's shape; "ops" in logs and metrics.
OPS = Dialect("ops", BACKENDAI.table, BACKENDAI.render, BACKENDAI.content_type)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpsHandler(BaseHandler):
    dialect = OPS
    auth_required = False
    quiet: ClassVar[bool] = True

    @property
    def health(self) -> Health:
        health: Health = self.application.settings["health"]
        return health


class MetricsHandler(OpsHandler):
    async def prepare(self) -> None:
        settings = self.bridge.settings
        mode = settings.metrics_auth
        if mode == "on" or (mode == "auto" and not is_loopback(settings.host)):
            self.keypair = await authenticate(self.request, self.bridge.keypairs)

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))


class HealthzHandler(OpsHandler):
    def get(self) -> None:
        self.send({"status": "ok"})


class ReadyzHandler(OpsHandler):
    async def get(self) -> None:
        ready = await self.health.readiness()
        self.set_header("Cache-Control", "no-store")
        self.send({"status": "ready" if ready.ready else "not ready", "checks": ready.checks},
                  200 if ready.ready else 503)


def routes() -> list[tuple[str, type[BaseHandler]]]:
    return [(r"/metrics", MetricsHandler), (r"/healthz", HealthzHandler),
            (r"/readyz", ReadyzHandler)]


OPERATIONS = [
    Operation("GET", "/metrics", "Prometheus metrics (text format; a key per KB_METRICS_AUTH)",
              "operations", errors=(401,), auth=False),
    Operation("GET", "/healthz", "Liveness: the process serves", "operations", auth=False),
    Operation("GET", "/readyz", "Readiness: store, sandbox and warm pool (503 when not ready)",
              "operations", errors=(503,), auth=False),
]

