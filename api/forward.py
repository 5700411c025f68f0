"""Forwarding a request to the replica that owns its session: HTTP (streamed both ways as far
as tornado allows: the response is relayed chunk by chunk, so SSE and downloads flow) and
WebSocket (frames piped in both directions).

The forwarding replica has authenticated the client; the owner learns who the client is from
``X-KB-Forwarded-Identity``, signed with the cluster secret (:mod:`bridge.replicas`), and from
nothing else: the client's own credentials are not passed on. A forwarded request is never
forwarded again (the owner serves it or answers 404), so a stale owner record cannot loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders, ResponseStartLine, parse_response_start_line
from tornado.iostream import StreamClosedError
from tornado.web import Finish, HTTPError, RequestHandler
from tornado.websocket import WebSocketClientConnection, WebSocketHandler, websocket_connect

from bridge.errors import KernelError
from bridge.tasks import spawn

from .auth import IDENTITY_HEADER

if TYPE_CHECKING:
    from .base import BaseHandler

log = logging.getLogger("kernel_bridge.api.forward")

# Never passed on: hop-by-hop headers (RFC 9110 §7.6.1), what the proxy sets itself, and the
# client's credentials (the owner trusts the signed identity only).
_REQUEST_DROP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
                 "transfer-encoding", "upgrade", "host", "content-length", "authorization",
                 "x-api-key", "sec-websocket-key", "sec-websocket-version",
                 "sec-websocket-extensions", "sec-websocket-protocol", IDENTITY_HEADER.lower()}
_RESPONSE_DROP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server",
                  "date"}
# Long enough for the longest run a request may wait on (a Sandbox timeout is at most 300 s)
# and for event streams; the client's disconnect ends a relay sooner.
RELAY_TIMEOUT_S = 3600.0
CONNECT_TIMEOUT_S = 5.0
_client: AsyncHTTPClient | None = None


class OwnerUnreachable(KernelError):
    """The owning replica did not answer: 503 in every dialect until it is adopted."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"The replica that owns this session ({url}) is unreachable: {why}. "
                         "Retry shortly; if it died, another replica adopts its sessions.")


def http_client() -> AsyncHTTPClient:
    # A client of our own: the shared one allows 10 connections, and event streams hold theirs.
    global _client
    if _client is None:
        _client = AsyncHTTPClient(force_instance=True, max_clients=1000)
    return _client


def _upstream_headers(handler: RequestHandler, identity: str) -> HTTPHeaders:
    headers = HTTPHeaders()
    for name, value in handler.request.headers.get_all():
        if name.lower() not in _REQUEST_DROP:
            headers.add(name, value)
    headers[IDENTITY_HEADER] = identity
    # One id for the request on both replicas (BaseHandler set it).
    headers["X-Request-Id"] = getattr(handler, "request_id", "")
    headers["X-Forwarded-For"] = handler.request.remote_ip or ""
    return headers


def _owner_url(owner: str, uri: str, websocket: bool = False) -> str:
    base = owner.rstrip("/")
    if websocket:
        base = "ws" + base[4:] if base.startswith("http") else base
    return base + uri


async def relay_http(handler: BaseHandler, owner: str, identity: str) -> None:
    """Answer ``handler``'s request with the owner's response, relayed as it arrives. Raises
    Finish when done, OwnerUnreachable (503) when no response came."""
    request = handler.request
    uri = request.uri or "/"
    started = False

    def on_header(line: str) -> None:
        nonlocal started
        if line.startswith("HTTP/"):
            start = parse_response_start_line(line.strip())
            assert isinstance(start, ResponseStartLine)
            if start.code == 100:
                return
            started = True
            handler.clear()
            handler.set_status(start.code, start.reason)
            for name in ("Content-Type", "X-Request-Id"):
                handler.clear_header(name)
            return
        if not line.strip() or not started:
            return
        name, _, value = line.partition(":")
        if name.strip().lower() not in _RESPONSE_DROP:
            handler.add_header(name.strip(), value.strip())

    def on_chunk(chunk: bytes) -> None:
        if handler.request.connection is None or _client_gone(handler):
            # The client left: raising here closes the upstream connection, so the owner's
            # stream ends too.
            raise StreamClosedError()
        handler.write(chunk)
        handler.flush()

    upstream = HTTPRequest(
        _owner_url(owner, uri), method=request.method or "GET",
        headers=_upstream_headers(handler, identity),
        body=request.body if request.body or request.method in ("POST", "PUT", "PATCH") else None,
        follow_redirects=False, decompress_response=False, allow_nonstandard_methods=True,
        connect_timeout=CONNECT_TIMEOUT_S, request_timeout=RELAY_TIMEOUT_S,
        header_callback=on_header, streaming_callback=on_chunk)
    try:
        await http_client().fetch(upstream, raise_error=False)
    except (TimeoutError, OSError, HTTPClientError) as exc:  # StreamClosedError is an OSError
        if not started:
            raise OwnerUnreachable(owner, str(exc) or type(exc).__name__) from None
        if not _client_gone(handler):
            log.warning("relay from %s cut short: %s", owner, exc)
        # A body cut short must not reach the client as a whole one: its connection ends
        # without the last chunk (and a client that left has nothing more to get).
        if handler.request.connection is not None:
            handler.request.connection.close()  # type: ignore[attr-defined]
    raise Finish()


async def fetch_json(handler: RequestHandler, replica: str, identity: str) -> Any:
    """``handler``'s GET, answered by another replica (a list the caller merges); None when
    that replica does not answer."""
    request = HTTPRequest(_owner_url(replica, handler.request.uri or "/"),
                          headers=_upstream_headers(handler, identity),
                          connect_timeout=CONNECT_TIMEOUT_S, request_timeout=10)
    try:
        response = await http_client().fetch(request)
        return json.loads(response.body)
    except (OSError, HTTPClientError, TimeoutError, ValueError) as exc:
        log.warning("replica %s did not list: %s", replica, exc)
        return None


def _client_gone(handler: BaseHandler) -> bool:
    stream = getattr(handler.request.connection, "stream", None)
    return stream is not None and stream.closed()


async def connect_websocket(handler: RequestHandler, owner: str,
                            identity: str) -> WebSocketClientConnection:
    """A WebSocket to the owner for ``handler``'s upgrade request, asking for the subprotocols
    the client asked for. Raises OwnerUnreachable, or the owner's refusal as an HTTPError."""
    headers = _upstream_headers(handler, identity)
    protocols = [p.strip() for p in handler.request.headers.get(
        "Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    request = HTTPRequest(_owner_url(owner, handler.request.uri or "/", websocket=True),
                          headers=headers, connect_timeout=CONNECT_TIMEOUT_S,
                          request_timeout=CONNECT_TIMEOUT_S * 2)
    try:
        return await websocket_connect(request, subprotocols=protocols or None)
    except HTTPClientError as exc:
        # The owner refused the upgrade (401, 404, …): the client gets that status.
        raise HTTPError(exc.code, "owner refused the WebSocket: %s", exc.message) from None
    except (TimeoutError, OSError) as exc:
        raise OwnerUnreachable(owner, str(exc) or type(exc).__name__) from None


class UpstreamSocket(WebSocketHandler):
    """A WebSocket handler that can pipe to the owner's socket instead of serving it here.

    :meth:`BaseHandler.prepare` sets ``upstream`` when another replica owns the route's
    session; the handler's ``open``, ``on_message``, ``on_close`` and ``select_subprotocol``
    then hand over to the ``pipe_*`` methods first thing."""

    upstream: WebSocketClientConnection | None = None
    _pump: asyncio.Task[None] | None = None

    async def connect_upstream(self, owner: str, identity: str) -> None:
        """Pipe this socket to ``owner``'s, once upgraded. Raises OwnerUnreachable."""
        self.upstream = await connect_websocket(self, owner, identity)

    def pipe_subprotocol(self, upstream: WebSocketClientConnection) -> str | None:
        return upstream.selected_subprotocol  # what the owner chose of the client's offer

    def pipe_open(self, upstream: WebSocketClientConnection) -> None:
        self.set_nodelay(True)  # small frames must not wait for Nagle (DESIGN.md)
        self._pump = spawn(self._from_owner(upstream))

    async def _from_owner(self, upstream: WebSocketClientConnection) -> None:
        while True:
            message = await upstream.read_message()
            if message is None:
                self.close(upstream.close_code or 1000, upstream.close_reason or "")
                return
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except Exception:  # the client is gone: end the owner's side too
                upstream.close()
                return

    async def pipe_message(self, upstream: WebSocketClientConnection,
                           message: str | bytes) -> None:
        await upstream.write_message(message, binary=isinstance(message, bytes))

    def pipe_close(self, upstream: WebSocketClientConnection) -> None:
        upstream.close(self.close_code, self.close_reason)
