"""The streaming execute WebSocket that `backend.ai run` drives, with a real WebSocket client."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import websocket

from .support import Client, Server


@pytest.fixture
def session(client: Client) -> Any:
    name = "st-" + uuid.uuid4().hex[:10]
    assert client.post("/session", json={"lang": "python", "name": name}).status_code == 201
    yield name
    client.delete(f"/session/{name}")


def connect(server: Server, session: str) -> websocket.WebSocket:
    url = server.url.replace("http://", "ws://") + f"/stream/session/{session}/execute"
    return websocket.create_connection(url, header=[f"X-API-Key: {server.secret_key}"],
                                       timeout=30)


def frames(ws: websocket.WebSocket) -> list[dict[str, Any]]:
    out = []
    while True:
        out.append(json.loads(ws.recv()))
        if out[-1]["status"] in ("finished", "exec-timeout", "waiting-input", "error"):
            return out


def test_stream_query_with_input(server: Server, session: str) -> None:
    ws = connect(server, session)
    ws.send(json.dumps({"code": "import time\nprint('a', flush=True)\ntime.sleep(0.5)\n"
                                "name = input('who? ')\nprint('hi', name)",
                        "mode": "query", "options": {}}))
    got = frames(ws)
    assert got[-1]["status"] == "waiting-input"
    assert got[-1]["options"] == {"is_password": False}
    text = "".join(v for f in got for k, v in f["console"] if k == "stdout")
    assert text == "a\nwho? "
    assert any(f["status"] == "continued" for f in got)  # output streamed before input
    ws.send("Lablup")
    got = frames(ws)
    assert got[-1]["status"] == "finished" and got[-1]["exitCode"] == 0
    assert "".join(v for f in got for k, v in f["console"] if k == "stdout") == "hi Lablup\n"
    assert set(got[-1]) == {"status", "console", "exitCode", "options", "files"}
    ws.close()


def test_stream_refuses_bad_requests(server: Server, session: str) -> None:
    url = server.url.replace("http://", "ws://") + f"/stream/session/{session}/execute"
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(url, timeout=10)
    assert exc.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(url.replace(session, "no-such-session"), timeout=10,
                                    header=[f"X-API-Key: {server.secret_key}"])
    assert exc.value.status_code == 404
    ws = connect(server, session)
    ws.send("{not json")
    assert json.loads(ws.recv())["status"] == "error"
    ws.send(json.dumps({"code": "1", "mode": "dance"}))
    assert json.loads(ws.recv())["status"] == "error"
    ws.close()
