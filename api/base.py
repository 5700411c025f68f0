"""The base handler: dependencies injected through initialize(), auth in prepare(), and the one
place that turns exceptions into a dialect's error body."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError
from tornado.web import Finish, HTTPError, RequestHandler

from bridge import metrics
from bridge.errors import BridgeError
from bridge.keypairs import Keypair
from bridge.replicas import OwnerKind
from bridge.service import Bridge

from .auth import IDENTITY_HEADER, authenticate
from .dialect import Dialect, MalformedBody, check_encodable
from .fields import WARNING_HEADER, describe_validation, unknown_fields, warning
from .forward import OwnerUnreachable, UpstreamSocket, fetch_json, relay_http
from .logs import REQUEST_ID_HEADER, request_id

log = logging.getLogger("kernel_bridge.api")
M = TypeVar("M", bound=BaseModel)


def allowed_methods(handler: type[RequestHandler]) -> list[str]:
    """The methods a handler implements (tornado's defaults for the rest answer 405)."""
    return [m for m in handler.SUPPORTED_METHODS
            if getattr(handler, m.lower()) is not getattr(RequestHandler, m.lower())]


class BaseHandler(RequestHandler):
    dialect: ClassVar[Dialect]
    auth_required: ClassVar[bool] = True
    keypair: Keypair
    quiet: ClassVar[bool] = False  # probes and scrapes: logged only when they fail
    session_id: str | None = None  # for the access log, once a handler knows its session
    error: BaseException | None = None
    request_id: str
    # What the route's first path argument names, so a request for something another replica
    # owns is forwarded there (bridge/replicas.py OwnerKind); None: served here.
    owner_of: ClassVar[OwnerKind | None] = None
    # A POST here may start a kernel: with replicas, the keypair's kernels on the others are
    # counted first, so its concurrency holds across the cluster.
    admits: ClassVar[bool] = False

    def initialize(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def set_default_headers(self) -> None:
        # Called again when an error clears the headers: the id must stay the same.
        if not hasattr(self, "request_id"):
            self.request_id = request_id(self.request.headers.get(REQUEST_ID_HEADER))
        self.set_header(REQUEST_ID_HEADER, self.request_id)

    async def prepare(self) -> None:
        if self.auth_required:
            self.keypair = await authenticate(self.request, self.bridge.keypairs,
                                              self.bridge.replicas)
            if self.owner_of is not None and self.path_args:
                await self.forward_if_elsewhere(self.owner_of, self.path_args[0])
            if self.admits and self.request.method == "POST":
                await self.bridge.replicas.count_elsewhere(self.keypair.access_key)

    async def forward_if_elsewhere(self, kind: OwnerKind, ident: str) -> None:
        """Hand the request to the replica that owns ``ident`` when that is not this one: an
        HTTP request is answered from there (raises Finish); a WebSocket gets ``upstream``.
        Raises OwnerUnreachable (503). A forwarded request is served here, never passed on."""
        if IDENTITY_HEADER in self.request.headers:
            return
        replicas = self.bridge.replicas
        owner = await replicas.owner(kind, self.keypair.access_key, ident)
        if owner is None:
            return
        identity = replicas.sign(self.keypair.access_key, self.request.method or "GET",
                                 self.request.uri or "/")
        transport = "websocket" if isinstance(self, UpstreamSocket) else "http"
        try:
            if isinstance(self, UpstreamSocket):
                await self.connect_upstream(owner, identity)
                metrics.FORWARDED.labels(transport, "ok").inc()
                return
            await relay_http(self, owner, identity)
        except OwnerUnreachable:
            metrics.FORWARDED.labels(transport, "unreachable").inc()
            raise
        except Finish:
            metrics.FORWARDED.labels(transport, "ok").inc()
            raise

    async def from_other_replicas(self) -> list[Any]:
        """The items this GET lists on every other live replica (a list route whose items
        live where their kernels do); [] without replicas, and for a forwarded request."""
        replicas = self.bridge.replicas
        if not replicas.clustered or IDENTITY_HEADER in self.request.headers:
            return []
        urls = [url for rid, url in (await replicas.live()).items() if rid != replicas.id]
        identity = replicas.sign(self.keypair.access_key, "GET", self.request.uri or "/")
        answers = await asyncio.gather(*(fetch_json(self, url, identity) for url in urls))
        return [item for answer in answers if isinstance(answer, list) for item in answer]

    # -- request bodies ---------------------------------------------------------------------

    def json_object(self, *, allow_empty: bool = True) -> Any:
        raw = self.request.body
        if not raw.strip():
            if allow_empty:
                return {}
            raise MalformedBody("The request body is empty; a JSON body is required.")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedBody(f"The request body is not valid JSON: {exc}.") from None
        return check_encodable(data)

    def parse(self, model: type[M], data: Any = None) -> M:
        """Validate the JSON body (or ``data``) against ``model``. Raises MalformedBody."""
        if data is None:
            data = self.json_object()
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            raise MalformedBody(describe_validation(exc, model)) from None
        unknown = unknown_fields(parsed)
        if unknown:  # an open schema: accepted, but the client is told (api/fields.py)
            self.add_header(WARNING_HEADER, warning(unknown))
        return parsed

    # -- responses --------------------------------------------------------------------------

    def send(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        if status == 204:
            self.finish()
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info[1] if exc_info else None
        self.error = exc  # the access log and the refusal metrics read it
        status, code, message = self.dialect.lookup(exc, status_code)
        if status >= 500 and not isinstance(exc, (BridgeError, HTTPError)):
            # A bug's own text (a path, a SQL statement, a repr) is for the log, which has it
            # under this request id (log_exception); the client gets the id to quote.
            message = (f"Internal server error (request id {self.request_id}); the server's "
                       "log has the details.")
        self.set_status(status)
        if status == 405:
            allowed = ", ".join(allowed_methods(type(self)))
            self.set_header("Allow", allowed)
            message = f"{self.request.method} is not allowed here; allowed: {allowed}."
        self.clear_header("Content-Type")
        self.set_header("Content-Type", self.dialect.content_type)
        self.finish(json.dumps(self.dialect.render(status, code, message)))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Expected errors are the client's business: log a line, not a stack.
        if isinstance(value, (BridgeError, HTTPError)):
            log.info("%s %s → %s: %s", self.request.method, self.request.path,
                     type(value).__name__, value)
        else:
            log.error("Uncaught exception in %s %s (request id %s)", self.request.method,
                      self.request.path, self.request_id, exc_info=(typ, value, tb),
                      extra={"request_id": self.request_id})
