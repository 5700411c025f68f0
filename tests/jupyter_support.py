"""A minimal Jupyter kernel WebSocket client for the tests, in either framing.

The v1 binary frames are packed and unpacked with jupyter_server's own functions, so the server
is checked against the reference implementation rather than against itself.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import websocket
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)

V1 = "v1.kernel.websocket.jupyter.org"


def request(msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "test",
                       "session": "test-session", "version": "5.3",
                       "date": "2024-01-01T00:00:00Z"},
            "parent_header": {}, "metadata": {}, "content": content}


def execute_request(code: str, allow_stdin: bool = False) -> dict[str, Any]:
    return request("execute_request", {"code": code, "silent": False, "store_history": True,
                                       "user_expressions": {}, "allow_stdin": allow_stdin,
                                       "stop_on_error": True})


class KernelSocket:
    def __init__(self, base_url: str, kernel_id: str, secret: str, *, v1: bool = False,
                 timeout: float = 30) -> None:
        url = base_url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        self.v1 = v1
        # Messages of other requests that arrived while one was awaited (a reply on shell can
        # overtake the previous request's idle on iopub): kept for when they are awaited.
        self.backlog: list[dict[str, Any]] = []
        self.ws = websocket.create_connection(
            url, header=[f"Authorization: token {secret}"], timeout=timeout,
            subprotocols=[V1] if v1 else None)

    def send(self, channel: str, msg: dict[str, Any]) -> str:
        if self.v1:
            parts = [json.dumps(msg[k]).encode()
                     for k in ("header", "parent_header", "metadata", "content")]
            self.ws.send_binary(serialize_msg_to_ws_v1(parts, channel))
        else:
            self.ws.send(json.dumps({**msg, "channel": channel}))
        return str(msg["header"]["msg_id"])

    def recv(self) -> dict[str, Any]:
        frame = self.ws.recv()
        if self.v1:
            assert isinstance(frame, bytes), "v1 frames are binary"
            channel, parts = deserialize_msg_from_ws_v1(frame)
            msg = {k: json.loads(p) for k, p in
                   zip(("header", "parent_header", "metadata", "content"), parts[:4], strict=False)}
            msg["channel"] = channel
            msg["msg_type"] = msg["header"]["msg_type"]
            return msg
        if isinstance(frame, bytes):
            return dict(deserialize_binary_message(frame))
        return dict(json.loads(frame))

    def until_done(self, msg_id: str, timeout: float = 30,
                   on_input: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """iopub messages of ``msg_id`` up to its idle status, and its shell reply."""
        iopub: list[dict[str, Any]] = []
        reply: dict[str, Any] | None = None
        idle = False
        deadline = time.monotonic() + timeout
        mine = [m for m in self.backlog if m["parent_header"].get("msg_id") == msg_id]
        self.backlog = [m for m in self.backlog if m not in mine]
        while not (idle and reply is not None):
            assert time.monotonic() < deadline, f"no reply to {msg_id} in {timeout} s"
            msg = mine.pop(0) if mine else self.recv()
            if msg["parent_header"].get("msg_id") != msg_id:
                self.backlog.append(msg)
                continue
            if msg["channel"] == "shell":
                reply = msg
            elif msg["channel"] == "stdin" and on_input is not None:
                on_input(msg)
            elif msg["channel"] == "iopub":
                iopub.append(msg)
                idle = idle or (msg["msg_type"] == "status"
                                and msg["content"]["execution_state"] == "idle")
        assert reply is not None
        return iopub, reply

    def run(self, code: str, timeout: float = 30) -> tuple[str, dict[str, Any]]:
        """stdout and the execute_reply of ``code``."""
        iopub, reply = self.until_done(self.send("shell", execute_request(code)), timeout)
        out = "".join(m["content"]["text"] for m in iopub
                      if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        for m in iopub:
            if m["msg_type"] == "execute_result":
                out += m["content"]["data"]["text/plain"]
        return out, reply

    def close(self) -> None:
        self.ws.close()
