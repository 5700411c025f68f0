"""Event streams (Server-Sent Events) through the real server: resume with Last-Event-ID,
slow readers, the bounded buffer's gap, a restart, the three kinds of records, ownership."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from .support import Client, Server, run_server

Event = tuple[int, str, dict[str, Any]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("events") / "data") as srv:
        yield srv


@pytest.fixture()
def client(server: Server) -> Client:
    return server.client()


def parse(text: str) -> list[Event]:
    out = []
    for block in text.strip().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return out


def read_events(client: Client, path: str, *, last: int | None = None, stop_after: int = 0,
                query: bool = False) -> list[Event]:
    """Read the stream; with ``stop_after`` disconnect after that many output events."""
    headers, params = {}, {}
    if last is not None:
        if query:
            params["last_event_id"] = str(last)
        else:
            headers["Last-Event-ID"] = str(last)
    got: list[Event] = []
    with client.get(path, headers=headers, params=params, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        buf = ""
        for chunk in r.iter_content(chunk_size=None, decode_unicode=True):
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                got += parse(block)
                outputs = sum(1 for _, e, _ in got if e in ("stdout", "stderr"))
                if stop_after and outputs >= stop_after:
                    return got  # leaving the with-block closes the connection mid-run
    return got


def submit(client: Client, code: str, **extra: Any) -> str:
    r = client.post("/api/v1/execute/async", json={"language": "python", "code": code, **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["execution_id"])


def text_of(events: list[Event], stream: str = "stdout") -> str:
    return "".join(d["text"] for _, e, d in events if e == stream)


def assert_contiguous(events: list[Event]) -> None:
    ids = [i for i, _, _ in events]
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids


COUNT = ("import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)\n")
COUNTED = "".join(f"{i}\n" for i in range(30))


def test_resume_after_disconnect_gets_every_event_once(client: Client) -> None:
    eid = submit(client, COUNT)
    path = f"/api/v1/execute/{eid}/events"
    first = read_events(client, path, stop_after=5)
    assert first[-1][1] != "end"  # left mid-run
    time.sleep(1.0)  # output goes on while nobody listens
    rest = read_events(client, path, last=first[-1][0])
    both = first + rest
    # What the run itself kept, to tell a stream that lost events from a run that lost output.
    record = client.get(f"/api/v1/execute/status/{eid}").json()
    assert record["result"]["stdout"] == COUNTED, record
    assert both[0][0] == 1
    assert_contiguous(both)  # every id once, in order
    assert text_of(both) == COUNTED
    assert both[-1][1] == "end" and both[-1][2]["status"] == "completed"
    assert both[-1][2]["reason"] == "completed"
    assert [e for _, e, _ in both].count("end") == 1
    # The same again from the start, with the query parameter instead of the header.
    again = read_events(client, path, last=0, query=True)
    assert again == both
    # Resuming after the end: nothing but... nothing (the stream ended).
    assert read_events(client, path, last=both[-1][0]) == []


def test_slow_reader_misses_nothing(server: Server, client: Client) -> None:
    # About 600 KB in 300 writes over ~3 s; the reader takes a few bytes at a time.
    code = ("import sys, time\nfor i in range(300):\n"
            "    sys.stdout.write(f'{i:05d}' + 'x' * 2000 + '\\n'); sys.stdout.flush()\n"
            "    time.sleep(0.01)\n")
    want = "".join(f"{i:05d}" + "x" * 2000 + "\n" for i in range(300))
    eid = submit(client, code)
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET /api/v1/execute/{eid}/events HTTP/1.1\r\nHost: x\r\n"
                 f"X-API-Key: {server.secret_key}\r\nConnection: close\r\n\r\n".encode())
    raw = b""
    started = time.monotonic()
    while time.monotonic() - started < 120:
        chunk = sock.recv(2048)
        if not chunk:
            break
        raw += chunk
        time.sleep(0.002)  # slower than the program writes: the server must wait for us
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    events = parse(_unchunk(body).decode())
    assert_contiguous(events)
    assert not [e for _, e, _ in events if e == "gap"]
    assert text_of(events) == want
    assert events[-1][1] == "end"


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def test_beyond_the_bound_a_gap(client: Client) -> None:
    # 3 MiB of output: more than a stream keeps (2 MiB). A reader from the start is told.
    code = "import sys\nfor i in range(3 * 1024):\n    sys.stdout.write('%1023d\\n' % i)\n"
    want = "".join(f"{i:1023d}\n" for i in range(3 * 1024))
    # Synchronous: answered once the record, and so the stream's end, is written.
    r = client.post("/api/v1/execute", json={"language": "python", "code": code,
                                             "timeout": 120})
    assert r.status_code == 200 and r.json()["reason"] == "completed", r.text
    eid = r.json()["execution_id"]
    events = read_events(client, f"/api/v1/execute/{eid}/events")
    assert events[0][1] == "gap"
    gap = events[0][2]
    assert gap["from"] == 1 and gap["to"] == events[0][0] and gap["missed"] == gap["to"]
    assert_contiguous(events)  # the gap carries the last id it stands for
    kept = text_of(events)
    assert want.endswith(kept) and 0 < len(kept) <= 2 * 1024 * 1024
    assert events[-1][1] == "end"


def test_streams_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data) as srv:
        secret = srv.secret_key
        c = srv.client()
        eid = submit(c, "for i in range(5): print(i)")
        before = read_events(c, f"/api/v1/execute/{eid}/events")
        # An execution cut off by the stop: its stream ends when the next server starts.
        cut = submit(c, "import time\nprint('started', flush=True)\ntime.sleep(60)")
        read_events(c, f"/api/v1/execute/{cut}/events", stop_after=1)
    with run_server(data) as srv:
        c = srv.client(secret)
        after = read_events(c, f"/api/v1/execute/{eid}/events", last=2)
        assert after == before[2:]
        cut_events = read_events(c, f"/api/v1/execute/{cut}/events")
        assert text_of(cut_events) == "started\n"
        assert cut_events[-1][1] == "end" and cut_events[-1][2]["status"] == "failed"


def test_job_and_backendai_run_streams(server: Server, client: Client) -> None:
    r = client.post("/api/v1/sessions", json={"mode": "dedicated"})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"code": "print('job out')"})
    job_id = r.json()["id"]
    events = read_events(client, f"/api/v1/jobs/{job_id}/events")
    assert text_of(events) == "job out\n"
    assert events[-1][1] == "end" and events[-1][2]["status"] == "completed"

    r = client.post("/session", json={"lang": "python", "name": "streamed"})
    assert r.status_code == 201, r.text
    uuid = r.json()["sessionId"]
    r = client.post("/session/streamed", json={
        "mode": "query", "runId": "run-1",
        "code": "import sys\nprint('a')\nprint('b', file=sys.stderr)"})
    assert r.json()["result"]["status"] == "finished"
    for ident in ("streamed", uuid):
        events = read_events(client, f"/session/{ident}/runs/run-1/events")
        assert text_of(events) == "a\n" and text_of(events, "stderr") == "b\n"
        assert events[-1][1] == "end" and events[-1][2]["status"] == "finished"
    client.delete("/session/streamed")
    # The session is gone; its run's stream is kept.
    events = read_events(client, "/session/streamed/runs/run-1/events")
    assert text_of(events) == "a\n"
    r = client.get("/session/streamed/runs/nope/events")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/problem+json"


def test_another_tenants_stream_is_404(server: Server, client: Client) -> None:
    eid = submit(client, "print(1)")
    read_events(client, f"/api/v1/execute/{eid}/events")
    r = client.post("/api/v1/sessions", json={"mode": "dedicated"})
    job_id = client.post(f"/api/v1/sessions/{r.json()['id']}/jobs",
                         json={"code": "print(2)"}).json()["id"]
    client.post("/session", json={"lang": "python", "name": "mine"})
    client.post("/session/mine", json={"mode": "query", "runId": "r", "code": "print(3)"})
    _, other_secret = server.new_keypair()
    other = server.client(other_secret)
    r = other.get(f"/api/v1/execute/{eid}/events")
    assert r.status_code == 404 and "detail" in r.json()
    r = other.get(f"/api/v1/jobs/{job_id}/events")
    assert r.status_code == 404 and "errors" in r.json()
    r = other.get("/session/mine/runs/r/events")
    assert r.status_code == 404
    # A bad Last-Event-ID is the client's mistake.
    r = client.get(f"/api/v1/execute/{eid}/events", headers={"Last-Event-ID": "x"})
    assert r.status_code == 400
    client.delete("/session/mine")
