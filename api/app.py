"""The tornado Application: every dialect's routes, each handler given the bridge."""

from __future__ import annotations

from typing import Any

from tornado.web import Application, RequestHandler

from bridge.health import Health
from bridge.service import Bridge

from . import docs, openapi, sse, webconsole
from . import ops as ops_routes
from .backendai import files as backendai_files
from .backendai import folders as backendai_folders
from .backendai import handlers as backendai
from .backendai import stream as backendai_stream
from .backendai.errors import BACKENDAI
from .base import BaseHandler
from .dialect import RouteNotFound
from .jobs import handlers as jobs
from .jobs.errors import IBM
from .jupyter import handlers as jupyter
from .jupyter.errors import JUPYTER
from .logs import log_request
from .sandbox import handlers as sandbox
from .sandbox.errors import SANDBOX


class NotFoundHandler(BaseHandler):
    """Unknown routes outside the other dialects' prefixes: Backend.AI's shape (the root's)."""

    dialect = BACKENDAI
    auth_required = False

    async def prepare(self) -> None:
        raise RouteNotFound(self.request.method or "GET", self.request.path)


# Unknown routes under a dialect's prefix answer in that dialect's shape; listed after every
# real route, so tornado reaches them only when nothing else matched.
class SandboxNotFound(NotFoundHandler):
    dialect = SANDBOX


class JobsNotFound(NotFoundHandler):
    dialect = IBM


class JupyterNotFound(NotFoundHandler):
    dialect = JUPYTER


NOT_FOUND: list[tuple[str, type[RequestHandler]]] = [
    (r"/api/v1/(?:sessions|jobs)(?:/.*)?", JobsNotFound),
    (r"/v1/sessions(?:/.*)?", JobsNotFound),
    (r"/api/v1/notebooks(?:/.*)?", JupyterNotFound),
    (r"/api/v1(?:/.*)?", SandboxNotFound),  # FastAPI's {"detail": "Not Found"}, as Nadoo
    (r"/api(?:/.*)?", JupyterNotFound),
]


class OpenAPIHandler(BaseHandler):
    dialect = BACKENDAI
    auth_required = False
    _doc: dict[str, Any] | None = None

    def get(self) -> None:
        if OpenAPIHandler._doc is None:
            OpenAPIHandler._doc = openapi.document(operations())
        self.send(OpenAPIHandler._doc)


def operations() -> list[openapi.Operation]:
    ops: list[openapi.Operation] = []
    ops += backendai.OPERATIONS
    ops += backendai_files.OPERATIONS + backendai_folders.OPERATIONS
    ops += jobs.OPERATIONS
    ops += sandbox.OPERATIONS
    ops += jupyter.OPERATIONS
    ops += sse.OPERATIONS
    ops += ops_routes.OPERATIONS
    return ops


def route_table() -> list[tuple[str, type[RequestHandler]]]:
    table: list[tuple[str, type[RequestHandler]]] = [(r"/api/openapi\.json", OpenAPIHandler),
                                                     (r"/api/docs/?", docs.DocsHandler)]
    table += ops_routes.routes()
    # Files and folders first: tornado takes the first match, and PREFIX/([^/]+) is a catch-all.
    table += backendai_stream.routes()
    table += sse.routes()
    table += backendai_files.routes()
    table += backendai_folders.routes()
    table += jupyter.routes()
    table += jobs.routes()
    table += sandbox.routes()
    table += backendai.routes()
    return table + NOT_FOUND


def make_app(bridge: Bridge, **settings: Any) -> Application:
    kwargs = {"bridge": bridge}
    console = [(pattern, handler, {**kwargs, **extra} if issubclass(handler, BaseHandler)
                else extra) for pattern, handler, extra in webconsole.routes()]
    return Application(
        docs.routes() + console
        + [(pattern, handler, kwargs) for pattern, handler in route_table()],
        default_handler_class=NotFoundHandler,
        default_handler_args=kwargs,
        log_function=log_request,
        health=Health(bridge),
        **settings,
    )
