"""The kernel WebSocket ``/api/kernels/{id}/channels``: one :class:`bridge.gateway.Relay` per
connection, framed as legacy JSON or as ``v1.kernel.websocket.jupyter.org`` (see wire.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tornado.iostream import StreamBufferFullError

from bridge.errors import BridgeError
from bridge.gateway import Relay
from bridge.messages import Channel, Message
from bridge.session import Session
from bridge.tasks import spawn

from ..forward import UpstreamSocket
from .base import JupyterHandler
from .wire import V1, decode_legacy, decode_v1, encode_legacy, encode_v1

log = logging.getLogger("kernel_bridge.api.jupyter")
MAX_UNREAD_BYTES = 16 * 1024 * 1024


class ChannelsHandler(UpstreamSocket, JupyterHandler):
    owner_of = "kernel"
    session: Session
    relay: Relay | None = None

    async def prepare(self) -> None:
        # Auth and the kernel's existence are checked before the upgrade, so a bad request gets
        # a plain 401/404 in the dialect's shape rather than a socket that closes at once.
        await super().prepare()
        if self.upstream is not None:
            return  # another replica owns the kernel: frames are piped there
        self.session = self.kernel(self.path_args[0])

    def check_origin(self, origin: str) -> bool:
        # No cookies here: every connection carries its own credentials, so a foreign page
        # gains nothing from a cross-origin socket.
        return True

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        if self.upstream is not None:
            return self.pipe_subprotocol(self.upstream)
        return V1 if V1 in subprotocols else None

    @property
    def v1(self) -> bool:
        return self.selected_subprotocol == V1

    async def open(self, *args: Any, **kwargs: Any) -> None:
        if self.upstream is not None:
            self.pipe_open(self.upstream)
            return
        # Small frames must leave at once: Nagle's algorithm costs ~40 ms a message (DESIGN.md).
        self.set_nodelay(True)
        # A client that does not read while its kernel floods would have the server buffer the
        # flood without end: past this, the connection is closed (clients reconnect).
        if self.ws_connection is not None and self.ws_connection.stream is not None:
            self.ws_connection.stream.max_write_buffer_size = MAX_UNREAD_BYTES
        try:
            self.relay = await self.bridge.gateway.connect(self.session, self._deliver,
                                                           self._kernel_gone)
        except BridgeError as exc:
            self.close(1011, exc.message[:120])

    def _deliver(self, channel: Channel, msg: Message) -> None:
        data = dict(msg)
        frame = encode_v1(channel, data) if self.v1 else encode_legacy(channel, data)
        # Raises WebSocketClosedError once the client is gone; the relay then closes itself.
        try:
            fut = self.write_message(frame, binary=isinstance(frame, bytes))
        except StreamBufferFullError:
            self.close(1008, "client not reading its kernel's output")
            raise
        fut.add_done_callback(_ignore_closed)

    def _kernel_gone(self) -> None:
        if self.ws_connection is not None:
            self.close(1000, "kernel shut down")

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            await self.pipe_message(self.upstream, message)
            return
        if self.relay is None:
            return
        try:
            channel, msg = decode_v1(message) if self.v1 else decode_legacy(message)
            self.relay.send(channel, msg)
        except BridgeError as exc:
            # Jupyter Server drops a bad frame and keeps the connection; so do we.
            log.info("kernel %s: dropped a client frame: %s", self.session.id, exc.message)

    def on_close(self) -> None:
        if self.upstream is not None:
            self.pipe_close(self.upstream)
        if self.relay is not None:
            relay, self.relay = self.relay, None
            spawn(relay.close())


def _ignore_closed(fut: asyncio.Future[None]) -> None:
    # A write that lost the race with the client's close: nothing to tell anyone.
    if not fut.cancelled():
        fut.exception()
