"""The server's side of a kernel's sockets, bounded whatever the kernel sends.

A kernel runs user code, and user code can write anything to the kernel's sockets (ipykernel
hands it ``kernel.session`` and ``iopub_socket``). So every socket the server opens to a kernel:

* refuses frames over ``KERNEL_MSG_CAP`` (``zmq.MAXMSGSIZE``): libzmq reads the frame's size
  before its body and drops the connection instead of allocating it;
* keeps at most ``KERNEL_RCVHWM`` messages queued unread. Past that libzmq stops reading the
  connection, the kernel's own send queue fills (in the kernel's memory, under its cap), and
  its PUB socket drops what no longer fits.

A refused frame ends the connection for good in libzmq (a protocol error is not reconnected),
which would leave a session deaf without a word. :func:`keep_connected` watches a socket for
that, connects it again, and tells its caller, who puts a notice in the affected run's output.
An ordinary disconnect (a kernel restarted or died) is libzmq's own business: it retries by
itself, and a disconnect/connect of ours racing its pipe teardown aborts the whole process
(``Assertion failed: !_more (src/fq.cpp)``). So the watcher steps in only when libzmq, within
:data:`SELF_RECONNECT_S`, neither reconnected nor scheduled a retry: the protocol-error case.

Not bounded here: one multipart message of many frames each under the cap (libzmq delivers a
multipart message whole, and has no limit on its number of frames). Kernels of this server send
at most a few frames; a hostile one could send many. SECURITY.md lists this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

# Larger than any console item a run keeps (KB_OUTPUT_LIMIT, 4 MiB by default), with room for
# a big figure shown in JupyterLab; anything larger is refused at the socket.
KERNEL_MSG_CAP = 16 * 1024 * 1024
KERNEL_RCVHWM = 4
# A kernel's headers are a few hundred bytes; one far larger is not worth parsing.
HEADER_CAP = 64 * 1024
# libzmq's first retry comes after ZMQ_RECONNECT_IVL (100 ms): ample time to see it happen.
SELF_RECONNECT_S = 1.0
# Events that show libzmq is reconnecting by itself.
SELF_RECONNECT_EVENTS = (zmq.EVENT_CONNECTED, zmq.EVENT_CONNECT_DELAYED,
                         zmq.EVENT_CONNECT_RETRIED)
RESET_NOTICE = (f"\n[kernel-bridge: a message from the kernel was lost: its connection was "
                f"reset (messages over {KERNEL_MSG_CAP // (1024 * 1024)} MiB are refused this "
                "way)]\n")


def harden(context: zmq.Context[Any]) -> None:
    """Make every socket ``context`` creates from now on bounded as above."""
    context.setsockopt(zmq.MAXMSGSIZE, KERNEL_MSG_CAP)
    context.setsockopt(zmq.RCVHWM, KERNEL_RCVHWM)


SocketOf = Callable[[], "zmq.asyncio.Socket | None"]


async def keep_connected(socket_of: SocketOf, on_reset: Callable[[], None]) -> None:
    """Forever: connect the socket ``socket_of()`` gives again whenever its connection drops,
    and call ``on_reset``. Follows a replaced socket (a kernel restart makes new ones)."""
    while True:
        sock = socket_of()
        if sock is None or sock.closed:
            await asyncio.sleep(0.1)
            continue
        try:
            monitor = sock.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED | zmq.EVENT_CONNECTED
                | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED)
        except zmq.ZMQError:
            await asyncio.sleep(0.1)
            continue
        try:
            await _watch(sock, monitor, socket_of, on_reset)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                if not sock.closed:
                    sock.disable_monitor()
            monitor.close(linger=0)


async def _watch(sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket, socket_of: SocketOf,
                 on_reset: Callable[[], None]) -> None:
    while socket_of() is sock and not sock.closed:
        try:
            async with asyncio.timeout(5.0):  # look again whether the socket was replaced
                event = await recv_monitor_message(monitor)
        except TimeoutError:
            continue
        if event["event"] == zmq.EVENT_MONITOR_STOPPED or sock.closed:
            return
        if event["event"] != zmq.EVENT_DISCONNECTED:
            continue
        if await _reconnects_by_itself(monitor):
            continue
        if socket_of() is not sock or sock.closed:
            return
        endpoint = event["endpoint"].decode()
        log.warning("kernel socket %s was refused a message; connecting again", endpoint)
        with contextlib.suppress(zmq.ZMQError):
            sock.disconnect(endpoint)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            log.warning("reconnecting %s failed: %s", endpoint, exc)
        on_reset()


async def _reconnects_by_itself(monitor: zmq.asyncio.Socket) -> bool:
    """Whether libzmq shows, within SELF_RECONNECT_S, that it is reconnecting on its own."""
    try:
        async with asyncio.timeout(SELF_RECONNECT_S):
            while True:
                event = await recv_monitor_message(monitor)
                if event["event"] in SELF_RECONNECT_EVENTS:
                    return True
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return True  # the socket is going away: nothing to repair
    except TimeoutError:
        return False


def guard(client: Any, channels: tuple[str, ...],
          on_reset: Callable[[str], None] | None = None) -> list[asyncio.Task[None]]:
    """:func:`keep_connected` tasks for a jupyter_client client's ``channels``; the caller
    cancels them when it stops the client."""
    def socket_of(channel: str) -> zmq.asyncio.Socket | None:
        chan = getattr(client, f"_{channel}_channel", None)
        return getattr(chan, "socket", None)

    def reset(channel: str) -> None:
        if on_reset is not None:
            on_reset(channel)

    return [asyncio.create_task(keep_connected(partial(socket_of, ch), partial(reset, ch)))
            for ch in channels]
