"""Jupyter Server's kernel REST API over the core's sessions (API.md "Jupyter dialect").

Enough of it that jupyter_server's GatewayClient (``jupyter lab --gateway-url=…``) works
unchanged: it POSTs ``{"name", "env"}``, polls ``GET /api/kernels`` and takes a kernel missing
from the list for culled, and reads ``id, name, last_activity, execution_state, connections``.
"""

from __future__ import annotations

import mimetypes
from typing import Any

from bridge import __version__
from bridge.gateway import DEFAULT_SPEC

from ..base import BaseHandler
from ..openapi import Operation
from .base import JupyterHandler
from .channels import ChannelsHandler
from .models import KernelModel, StartKernel
from .notebooks import NOTEBOOK_OPERATIONS, ExecuteNotebookHandler

# The Jupyter Server REST API level these routes follow.
API_VERSION = "2.0.0"


class ApiHandler(JupyterHandler):
    def get(self) -> None:
        self.send({"version": API_VERSION, "server": f"kernel-bridge {__version__}"})


class KernelspecsHandler(JupyterHandler):
    def get(self) -> None:
        """Kernelspecs whose toolchain is installed."""
        self.send({"default": DEFAULT_SPEC, "kernelspecs": self.bridge.gateway.kernelspecs()})


class KernelspecHandler(JupyterHandler):
    def get(self, name: str) -> None:
        """One kernelspec. 404."""
        self.send(self.bridge.gateway.kernelspec(name))


class KernelspecResourceHandler(JupyterHandler):
    def get(self, name: str, resource: str) -> None:
        """A kernelspec's logo. 404; 400 for a path out of the spec's directory."""
        path = self.bridge.gateway.resource(name, resource)
        self.set_header("Content-Type",
                        mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.finish(path.read_bytes())  # a logo of a few KiB


class KernelsHandler(JupyterHandler):
    admits = True

    async def get(self) -> None:
        """Every live kernel (session) of this keypair, on every replica."""
        gw = self.bridge.gateway
        mine = [gw.model(s) for s in gw.kernels(self.keypair.access_key)]
        self.send(mine + await self.from_other_replicas())

    async def post(self) -> None:
        """Start a kernel: 201 with its model. 400, 403 over quota, 404 no such kernelspec."""
        body = self.parse(StartKernel)
        session = await self.bridge.gateway.create(self.keypair.access_key, body.name,
                                                   _str_env(body.env))
        self.set_header("Location", f"/api/kernels/{session.id}")
        self.send(self.bridge.gateway.model(session), 201)


def _str_env(env: dict[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (env or {}).items()}


class KernelHandler(JupyterHandler):
    owner_of = "kernel"

    def get(self, kernel_id: str) -> None:
        """A kernel's model. 404."""
        self.send(self.bridge.gateway.model(self.kernel(kernel_id)))

    async def delete(self, kernel_id: str) -> None:
        """Shut the kernel down and end its session: 204. 404."""
        await self.bridge.sessions.destroy(self.kernel(kernel_id), "jupyter-shutdown")
        self.send(None, 204)


class InterruptHandler(JupyterHandler):
    owner_of = "kernel"

    async def post(self, kernel_id: str) -> None:
        """Interrupt (message mode: kernels run in bwrap): 204. 404."""
        await self.bridge.sessions.interrupt(self.kernel(kernel_id))
        self.send(None, 204)


class RestartHandler(JupyterHandler):
    owner_of = "kernel"

    async def post(self, kernel_id: str) -> None:
        """Restart the kernel: 200 with its model. 404."""
        session = self.kernel(kernel_id)
        await self.bridge.gateway.restart(session)
        self.send(self.bridge.gateway.model(session))


_ID = r"([^/]+)"
OPERATIONS = [
    Operation("GET", "/api", "Jupyter Server API version", "jupyter"),
    Operation("GET", "/api/kernelspecs", "Available kernelspecs", "jupyter", errors=(401,)),
    Operation("GET", "/api/kernelspecs/{name}", "One kernelspec", "jupyter",
              errors=(401, 404)),
    Operation("GET", "/api/kernels", "Running kernels", "jupyter", errors=(401,)),
    Operation("POST", "/api/kernels", "Start a kernel", "jupyter", StartKernel, KernelModel,
              201, (400, 401, 403, 404)),
    Operation("GET", "/api/kernels/{id}", "A kernel's model", "jupyter",
              response=KernelModel, errors=(401, 404)),
    Operation("DELETE", "/api/kernels/{id}", "Shut a kernel down", "jupyter", status=204,
              errors=(401, 404)),
    Operation("POST", "/api/kernels/{id}/interrupt", "Interrupt a kernel", "jupyter",
              status=204, errors=(401, 404)),
    Operation("POST", "/api/kernels/{id}/restart", "Restart a kernel", "jupyter",
              response=KernelModel, errors=(401, 404)),
    *NOTEBOOK_OPERATIONS,
]


def routes() -> list[tuple[str, type[BaseHandler]]]:
    return [
        (r"/api/?", ApiHandler),
        (r"/api/kernelspecs/?", KernelspecsHandler),
        (r"/api/kernelspecs/" + _ID + "/?", KernelspecHandler),
        (r"/kernelspecs/" + _ID + r"/(.+)", KernelspecResourceHandler),
        (r"/api/kernels/?", KernelsHandler),
        (r"/api/kernels/" + _ID + r"/interrupt/?", InterruptHandler),
        (r"/api/kernels/" + _ID + r"/restart/?", RestartHandler),
        (r"/api/kernels/" + _ID + r"/channels/?", ChannelsHandler),
        (r"/api/kernels/" + _ID + "/?", KernelHandler),
        (r"/api/v1/notebooks/execute/?", ExecuteNotebookHandler),
    ]
