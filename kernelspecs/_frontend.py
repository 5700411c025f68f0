"""Asking the frontend for a line of input without blocking the kernel's event loop.

ipykernel's own ``Kernel._input_request`` blocks the thread until the reply comes, which would
stop the kernel from reading the program's output meanwhile; this polls the stdin socket instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import zmq
from jupyter_client.session import Session

_POLL_SECONDS: Final = 0.02


async def ask_frontend(session: Session, sock: Any, parent: dict[str, Any], ident: Any,
                       prompt: str = "", password: bool = False) -> str | None:
    """Send an ``input_request`` answering ``parent``; the reply's value, or None for EOF
    (Ctrl-D, sent as "\\x04")."""
    while sock.poll(0):  # purge replies to an earlier, abandoned request
        sock.recv_multipart(zmq.NOBLOCK)
    session.send(sock, "input_request", {"prompt": prompt, "password": password}, parent,
                 ident=ident)
    while True:
        if sock.poll(0):
            _, reply = session.recv(sock, mode=zmq.NOBLOCK)
            if reply is not None:
                break
        await asyncio.sleep(_POLL_SECONDS)
    value = reply.get("content", {}).get("value", "")
    if not isinstance(value, str) or value == "\x04":
        return None
    return value
