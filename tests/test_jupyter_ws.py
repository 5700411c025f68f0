"""The kernel WebSocket /api/kernels/{id}/channels through the real server (issue 7): both
framings, stdin, interrupt and restart, on one python kernel."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import websocket

from .jupyter_support import V1, KernelSocket, execute_request, request
from .support import Client, Server


@pytest.fixture(scope="module")
def kernel(server: Server) -> Iterator[str]:
    with server.client() as c:
        r = c.post("/api/kernels", json={"name": "python3"})
        assert r.status_code == 201, r.text
        kid = r.json()["id"]
        yield kid
        c.delete(f"/api/kernels/{kid}")


@pytest.fixture(params=["legacy", "v1"])
def sock(request: pytest.FixtureRequest, server: Server, kernel: str) -> Iterator[KernelSocket]:
    s = KernelSocket(server.url, kernel, server.secret_key, v1=request.param == "v1")
    yield s
    s.close()


def test_execute_in_both_framings(sock: KernelSocket) -> None:
    if sock.v1:
        assert sock.ws.subprotocol == V1
    else:
        assert sock.ws.subprotocol is None
    msg_id = sock.send("shell", execute_request("print(6 * 7)\n'done'"))
    iopub, reply = sock.until_done(msg_id)
    assert reply["msg_type"] == "execute_reply" and reply["content"]["status"] == "ok"
    types = [m["msg_type"] for m in iopub]
    assert types[0] == "status" and "execute_input" in types
    streams = [m["content"]["text"] for m in iopub if m["msg_type"] == "stream"]
    assert streams == ["42\n"]
    result = next(m for m in iopub if m["msg_type"] == "execute_result")
    assert result["content"]["data"]["text/plain"] == "'done'"


def test_state_is_shared_between_connections(server: Server, kernel: str) -> None:
    a = KernelSocket(server.url, kernel, server.secret_key, v1=True)
    b = KernelSocket(server.url, kernel, server.secret_key)
    try:
        assert a.run("shared = 'from-v1'")[1]["content"]["status"] == "ok"
        assert b.run("print(shared)")[0] == "from-v1\n"
    finally:
        a.close()
        b.close()


def test_input_request_answered_over_stdin(sock: KernelSocket) -> None:
    prompts = []

    def answer(msg: dict[str, object]) -> None:
        assert msg["msg_type"] == "input_request"
        prompts.append(msg["content"]["prompt"])  # type: ignore[index]
        reply = request("input_reply", {"value": "bob"})
        reply["parent_header"] = msg["header"]
        sock.send("stdin", reply)

    msg_id = sock.send("shell", execute_request("n = input('who? ')\nprint('hi', n)",
                                                allow_stdin=True))
    iopub, reply = sock.until_done(msg_id, on_input=answer)
    assert prompts == ["who? "]
    assert reply["content"]["status"] == "ok"
    out = "".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream")
    assert "hi bob" in out


def test_interrupt_stops_a_running_cell(server: Server, client: Client, kernel: str) -> None:
    sock = KernelSocket(server.url, kernel, server.secret_key)
    try:
        msg_id = sock.send("shell", execute_request("import time\ntime.sleep(60)"))
        # Wait until the kernel runs it: the model shows busy and this connection.
        deadline = time.monotonic() + 10
        while True:
            model = client.get(f"/api/kernels/{kernel}").json()
            if model["execution_state"] == "busy":
                break
            assert time.monotonic() < deadline, model
            time.sleep(0.1)
        assert model["connections"] >= 1
        started = time.monotonic()
        assert client.post(f"/api/kernels/{kernel}/interrupt").status_code == 204
        _iopub, reply = sock.until_done(msg_id, timeout=15)
        assert time.monotonic() - started < 10
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert sock.run("print('still alive')")[0] == "still alive\n"
    finally:
        sock.close()


def statuses_until_idle(sock: KernelSocket, timeout: float = 30) -> list[str]:
    """Execution states the socket receives up to the first ``idle`` after a ``starting``."""
    states: list[str] = []
    deadline = time.monotonic() + timeout
    while not ("starting" in states and states[-1] == "idle"):
        assert time.monotonic() < deadline, states
        msg = sock.recv()
        if msg["msg_type"] == "status":
            states.append(msg["content"]["execution_state"])
    return states


def test_requested_restart_says_starting_never_restarting(server: Server, client: Client,
                                                         kernel: str) -> None:
    """``restarting`` means "the kernel died and is being restarted": JupyterLab answers it
    with a "kernel appears to have died" dialog. A restart the client asked for is not that."""
    sock = KernelSocket(server.url, kernel, server.secret_key, v1=True)
    try:
        sock.run("before_restart = 1")
        r = client.post(f"/api/kernels/{kernel}/restart")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == kernel and r.json()["execution_state"] == "idle"
        states = statuses_until_idle(sock)
        assert "restarting" not in states, states
        # The connection lives on, on the new kernel, and nothing later says restarting.
        msg_id = sock.send("shell", execute_request("print('before_restart' in globals())"))
        iopub, reply = sock.until_done(msg_id)
        assert reply["content"]["status"] == "ok"
        assert [m["content"]["text"] for m in iopub if m["msg_type"] == "stream"] == ["False\n"]
        assert all(m["content"]["execution_state"] != "restarting"
                   for m in iopub if m["msg_type"] == "status")
    finally:
        sock.close()


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_execute_sent_at_once_on_a_new_kernel_is_answered(server: Server, client: Client,
                                                          v1: bool) -> None:
    """What JupyterLab does when a cell is run as a notebook opens: start a kernel, open the
    socket, send at once (no waiting for a status or a kernel_info reply)."""
    r = client.post("/api/kernels", json={"name": "python3"})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        sock = KernelSocket(server.url, kid, server.secret_key, v1=v1)
        try:
            first = sock.send("shell", execute_request("print('first cell')"))
            info = sock.send("shell", request("kernel_info_request", {}))
            iopub, reply = sock.until_done(first, timeout=30)
            assert reply["content"]["status"] == "ok"
            assert [m["content"]["text"] for m in iopub
                    if m["msg_type"] == "stream"] == ["first cell\n"]
            _iopub, info_reply = sock.until_done(info, timeout=30)
            assert info_reply["content"]["language_info"]["name"] == "python"
        finally:
            sock.close()
    finally:
        client.delete(f"/api/kernels/{kid}")


def test_bad_frames_are_dropped_and_the_connection_lives(server: Server, kernel: str) -> None:
    sock = KernelSocket(server.url, kernel, server.secret_key)
    try:
        sock.ws.send("not json")
        sock.ws.send('{"channel": "iopub", "header": {"msg_id": "x", "msg_type": "status"}}')
        sock.ws.send('{"channel": "shell", "content": {}}')
        assert sock.run("print(1 + 1)")[0] == "2\n"
    finally:
        sock.close()


def test_unknown_kernel_and_missing_credentials(server: Server, kernel: str) -> None:
    base = server.url.replace("http", "ws", 1)
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(f"{base}/api/kernels/no-such-kernel/channels",
                                    header=[f"Authorization: token {server.secret_key}"])
    assert e.value.status_code == 404
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(f"{base}/api/kernels/{kernel}/channels")
    assert e.value.status_code == 401
    # Browsers cannot set headers on a WebSocket: ?token= works as in Jupyter Server.
    ws = websocket.create_connection(f"{base}/api/kernels/{kernel}/channels"
                                     f"?token={server.secret_key}")
    ws.close()
