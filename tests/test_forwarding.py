"""Forwarding to the replica that owns a session (api/forward.py), against a real owner.

The owner is a real kernel-bridge server. In front of it runs a forwarder made of
api/forward.py's relay functions in a tornado app of its own: it signs each request's identity
with the owner's cluster secret, as a replica does after it has authenticated the client. Every
kind of traffic a replica forwards goes through it: REST calls, uploads, downloads, an event
stream (as it happens, not at its end) and a Jupyter kernel WebSocket in both framings. The
owner must trust a correctly signed identity and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from tornado.web import Application, RequestHandler

from api.auth import IDENTITY_HEADER
from api.backendai.errors import BACKENDAI
from api.base import BaseHandler
from api.forward import UpstreamSocket, relay_http
from bridge.replicas import sign_identity

from .jupyter_support import KernelSocket, execute_request
from .support import Server, free_port, run_server


@dataclass
class Target:
    owner: str
    secret: str
    access_key: str

    def identity(self, method: str, uri: str) -> str:
        return sign_identity(self.secret, "test-forwarder", self.access_key, method, uri)


class Forward(BaseHandler):
    """Every request, relayed to the owner as the target's keypair."""

    dialect = BACKENDAI
    auth_required = False

    def initialize(self, target: Target) -> None:  # type: ignore[override]
        self.target = target

    async def prepare(self) -> None:
        req = self.request
        await relay_http(self, self.target.owner, self.target.identity(req.method or "GET",
                                                                       req.uri or "/"))


class ForwardSocket(UpstreamSocket, BaseHandler):
    dialect = BACKENDAI
    auth_required = False

    def initialize(self, target: Target) -> None:  # type: ignore[override]
        self.target = target

    async def prepare(self) -> None:
        await self.connect_upstream(self.target.owner,
                                     self.target.identity("GET", self.request.uri or "/"))

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        assert self.upstream is not None
        return self.pipe_subprotocol(self.upstream)

    def open(self, *args: Any, **kwargs: Any) -> None:
        assert self.upstream is not None
        self.pipe_open(self.upstream)

    async def on_message(self, message: str | bytes) -> None:
        assert self.upstream is not None
        await self.pipe_message(self.upstream, message)

    def on_close(self) -> None:
        assert self.upstream is not None
        self.pipe_close(self.upstream)


class CutShort(RequestHandler):
    """An owner that dies mid-answer: part of a body, then the connection drops."""

    async def get(self) -> None:
        self.write(b"the first half")
        await self.flush()
        assert self.request.connection is not None
        self.request.connection.close()  # type: ignore[attr-defined]


@contextmanager
def background_app(routes: list[Any]) -> Iterator[str]:
    """A tornado app serving ``routes`` on a thread of its own; yields its URL."""
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        server = Application(routes).listen(port, "127.0.0.1")
        ready.set()
        await stop.wait()
        server.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@contextmanager
def forwarder(target: Target) -> Iterator[str]:
    """A server that forwards everything to the target's owner."""
    with background_app([(r"/api/kernels/[^/]+/channels", ForwardSocket, {"target": target}),
                         (r"/.*", Forward, {"target": target})]) as url:
        yield url


def cluster_secret(server: Server) -> str:
    db = sqlite3.connect(server.data_dir / "kernel-bridge.sqlite3")
    try:
        return str(db.execute("SELECT value FROM cluster WHERE name='secret'").fetchone()[0])
    finally:
        db.close()


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("owner") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def front(owner: Server) -> Iterator[str]:
    with forwarder(Target(owner.url, cluster_secret(owner), owner.access_key)) as url:
        yield url


def query(base: str, session: str, code: str, **headers: str) -> dict[str, object]:
    r = requests.post(f"{base}/kernel/{session}", json={"mode": "query", "code": code},
                      headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()["result"]
    return result


def test_a_session_is_driven_through_the_forwarder(owner: Server, front: str) -> None:
    # No credentials at the forwarder: the identity it signs is all the owner goes by.
    r = requests.post(f"{front}/kernel/create", json={"lang": "python",
                                                       "clientSessionToken": "fwd-1"}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert query(front, "fwd-1", "x = 41; x += 1")["status"] == "finished"
    # The owner's kernel holds the state the forwarded query made.
    direct = query(owner.url, "fwd-1", "print(x)", **{"X-API-Key": owner.secret_key})
    assert direct["console"] == [["stdout", "42\n"]]

    upload = requests.post(f"{front}/kernel/fwd-1/upload", timeout=60, files=[
        ("src", ("data.txt", b"hello through a replica\n")),
        ("src", ("big.bin", bytes(range(256)) * 2048))])
    assert upload.status_code == 204, upload.text
    # Backend.AI lists a directory from a JSON body on GET: the body must be relayed too.
    listing = requests.get(f"{front}/kernel/fwd-1/files", json={"path": "."}, timeout=60)
    assert listing.status_code == 200, listing.text
    names = {f["filename"] for f in json.loads(listing.json()["files"])}
    assert {"data.txt", "big.bin"} <= names
    single = requests.get(f"{front}/kernel/fwd-1/download_single", params={"file": "big.bin"},
                          timeout=60)
    assert single.status_code == 200 and single.content == bytes(range(256)) * 2048
    multi = requests.get(f"{front}/kernel/fwd-1/download", params={"files": "data.txt"},
                         timeout=60)
    assert multi.status_code == 200
    assert multi.headers["Content-Type"].startswith("multipart/mixed")
    # One tar per file inside the multipart body: the file's bytes arrive whole.
    assert b"hello through a replica\n" in multi.content

    # Errors come back in the dialect's shape, with the owner's status.
    missing = requests.get(f"{front}/kernel/nope", timeout=60)
    assert missing.status_code == 404
    assert missing.headers["Content-Type"].startswith("application/problem+json")

    gone = requests.delete(f"{front}/kernel/fwd-1", timeout=60)
    assert gone.status_code == 200 and "stats" in gone.json()
    after = requests.get(f"{owner.url}/kernel/fwd-1", headers={"X-API-Key": owner.secret_key},
                         timeout=60)
    assert after.status_code == 404


def test_an_event_stream_flows_as_it_happens(front: str) -> None:
    r = requests.post(f"{front}/api/v1/execute/async", timeout=60, json={
        "language": "python",
        "code": "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')"})
    assert r.status_code == 200, r.text
    eid = r.json()["execution_id"]
    seen: list[tuple[float, str, str]] = []
    started = time.monotonic()
    with requests.get(f"{front}/api/v1/execute/{eid}/events", stream=True, timeout=60) as s:
        assert s.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        for line in s.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.append((time.monotonic() - started, event, line[6:]))
                if event == "end":
                    break
    outputs = [(t, json.loads(d)["text"]) for t, e, d in seen if e == "stdout"]
    assert [text for _, text in outputs] == ["first\n", "second\n"]
    # "first" reached the client while the run still slept: relayed, not buffered to the end.
    assert outputs[1][0] - outputs[0][0] > 1.5, outputs
    assert seen[-1][1] == "end"


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_a_kernel_websocket_is_piped_to_the_owner(owner: Server, front: str, v1: bool) -> None:
    r = requests.post(f"{front}/api/kernels", json={"name": "python3"}, timeout=60)
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        sock = KernelSocket(front, kid, "ignored-by-the-forwarder", v1=v1)
        try:
            if v1:
                assert sock.ws.subprotocol == "v1.kernel.websocket.jupyter.org"
            msg_id = sock.send("shell", execute_request("y = 6 * 7\nprint(y)"))
            iopub, reply = sock.until_done(msg_id)
            assert reply["content"]["status"] == "ok"
            assert [m["content"]["text"] for m in iopub if m["msg_type"] == "stream"] == ["42\n"]
        finally:
            sock.close()
        # Straight to the owner: the same kernel, with the state the piped socket made.
        direct = KernelSocket(owner.url, kid, owner.secret_key, v1=v1)
        try:
            assert direct.run("print(y)")[0] == "42\n"
        finally:
            direct.close()
    finally:
        requests.delete(f"{front}/api/kernels/{kid}", timeout=60)


def test_the_owner_trusts_a_signed_identity_only(owner: Server) -> None:
    secret = cluster_secret(owner)
    uri = "/kernel/create"
    body = {"lang": "python", "clientSessionToken": "trust"}

    def post(identity: str, **extra: str) -> requests.Response:
        return requests.post(owner.url + uri, json=body, timeout=60,
                             headers={IDENTITY_HEADER: identity, **extra})

    forged = sign_identity("not-the-cluster-secret", "r", owner.access_key, "POST", uri)
    assert post(forged).status_code == 401
    # Signed for another route, or long ago: worthless here.
    assert post(sign_identity(secret, "r", owner.access_key, "POST", "/kernel")).status_code \
        == 401
    stale = sign_identity(secret, "r", owner.access_key, "POST", uri, now=time.time() - 600)
    assert post(stale).status_code == 401
    assert post("v1;r;" + owner.access_key + ";0;deadbeef").status_code == 401
    # A bad identity is not rescued by a good key sent beside it.
    assert post(forged, **{"X-API-Key": owner.secret_key}).status_code == 401
    good = post(sign_identity(secret, "r", owner.access_key, "POST", uri))
    assert good.status_code == 201, good.text
    requests.delete(owner.url + "/kernel/trust", headers={"X-API-Key": owner.secret_key},
                    timeout=60)


def test_an_unreachable_owner_is_a_503(owner: Server) -> None:
    target = Target(f"http://127.0.0.1:{free_port()}", "s", owner.access_key)
    with forwarder(target) as url:
        r = requests.get(f"{url}/kernel/anything", timeout=60)
    assert r.status_code == 503
    assert "unreachable" in r.json()["msg"]


def test_a_body_cut_short_at_the_owner_is_cut_short_for_the_client(owner: Server) -> None:
    # Never a clean answer with half a file: the client sees its connection fail.
    cut = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
    with background_app([(r"/.*", CutShort)]) as dying, \
            forwarder(Target(dying, "s", owner.access_key)) as url, pytest.raises(cut):
        requests.get(f"{url}/kernel/x/download_single", timeout=30)
