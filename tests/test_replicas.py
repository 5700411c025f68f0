"""Two real replicas on one PostgreSQL database and one data dir (issue 16): any replica answers
any request, the one that owns a session serving it (the other forwards, signed)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
import websocket

from .jupyter_support import KernelSocket, execute_request
from .pg import Cluster
from .support import Client, Server, run_server

LEASE_S = "4"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         pg_cluster: Cluster) -> Iterator[tuple[Server, Server]]:
    url = pg_cluster.create_database()
    data = tmp_path_factory.mktemp("replicas") / "data"
    try:
        with run_server(data, database_url=url, lease_s=LEASE_S) as one, \
                run_server(data, database_url=url, lease_s=LEASE_S) as two:
            yield one, two
    finally:
        pg_cluster.drop_database(url)


@pytest.fixture
def clients(pair: tuple[Server, Server]) -> Iterator[tuple[Client, Client]]:
    one, two = pair
    # One keypair, used at both doors.
    with Client(one.url, one.secret_key) as c1, Client(two.url, one.secret_key) as c2:
        yield c1, c2


def query(client: Client, session: str, code: str) -> dict[str, object]:
    r = client.post(f"/kernel/{session}", json={"mode": "query", "code": code})
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()["result"]
    return result


def test_a_session_of_replica_1_is_used_through_replica_2(
        clients: tuple[Client, Client]) -> None:
    c1, c2 = clients
    r = c1.post("/kernel/create", json={"lang": "python", "clientSessionToken": "shared-1"})
    assert r.status_code == 201, r.text
    assert query(c1, "shared-1", "x = 42")["status"] == "finished"
    # Queried through replica 2: the kernel replica 1 started, with its state.
    assert query(c2, "shared-1", "print(x)")["console"] == [["stdout", "42\n"]]
    info = c2.get("/kernel/shared-1")
    assert info.status_code == 200 and info.json()["numQueriesExecuted"] == 2
    # Reuse by name through replica 2 finds replica 1's session, not a second one.
    again = c2.post("/kernel/create", json={"lang": "python", "clientSessionToken": "shared-1"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["sessionId"] == r.json()["sessionId"]

    up = c2.post("/kernel/shared-1/upload", files=[("src", ("via-2.txt", b"two\n"))])
    assert up.status_code == 204, up.text
    assert query(c1, "shared-1", "print(open('via-2.txt').read(), end='')")["console"] == \
        [["stdout", "two\n"]]
    listing = c2.get("/kernel/shared-1/files", json={"path": "."})
    assert "via-2.txt" in {f["filename"] for f in json.loads(listing.json()["files"])}
    single = c2.get("/kernel/shared-1/download_single", params={"file": "via-2.txt"})
    assert single.status_code == 200 and single.content == b"two\n"
    multi = c2.get("/kernel/shared-1/download", params={"files": "via-2.txt"})
    assert multi.status_code == 200 and b"two\n" in multi.content

    scrape = c2.get("/metrics").text
    assert 'kernel_bridge_forwarded_requests_total{outcome="ok",transport="http"}' in scrape \
        or 'kernel_bridge_forwarded_requests_total{transport="http",outcome="ok"}' in scrape

    gone = c2.delete("/kernel/shared-1")
    assert gone.status_code == 200, gone.text
    assert c1.get("/kernel/shared-1").status_code == 404
    assert c2.get("/kernel/shared-1").status_code == 404


def test_a_jupyter_socket_through_replica_2_drives_replica_1s_kernel(
        pair: tuple[Server, Server], clients: tuple[Client, Client]) -> None:
    one, two = pair
    c1, c2 = clients
    r = c1.post("/api/kernels", json={"name": "python3"})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        assert c2.get(f"/api/kernels/{kid}").json()["id"] == kid
        # JupyterLab polls the list and takes a kernel missing from it for culled: every
        # replica lists every replica's kernels, each once.
        for c in (c1, c2):
            assert [k["id"] for k in c.get("/api/kernels").json()].count(kid) == 1
        sock = KernelSocket(two.url, kid, one.secret_key, v1=True)
        try:
            msg_id = sock.send("shell", execute_request("k = 'set via replica 2'\nprint(k)"))
            iopub, reply = sock.until_done(msg_id)
            assert reply["content"]["status"] == "ok"
            assert [m["content"]["text"] for m in iopub if m["msg_type"] == "stream"] == \
                ["set via replica 2\n"]
        finally:
            sock.close()
        direct = KernelSocket(one.url, kid, one.secret_key)
        try:
            assert direct.run("print(k)")[0] == "set via replica 2\n"
        finally:
            direct.close()
    finally:
        assert c2.delete(f"/api/kernels/{kid}").status_code == 204
    assert c1.get(f"/api/kernels/{kid}").status_code == 404


def test_a_backendai_stream_through_replica_2_drives_replica_1s_session(
        pair: tuple[Server, Server], clients: tuple[Client, Client]) -> None:
    one, two = pair
    c1, _ = clients
    assert c1.post("/session", json={"lang": "python", "name": "streamed-1"}).status_code == 201
    try:
        ws = websocket.create_connection(
            two.url.replace("http://", "ws://") + "/stream/session/streamed-1/execute",
            header=[f"X-API-Key: {one.secret_key}"], timeout=30)
        ws.send(json.dumps({"code": "name = input('who? ')\nprint('hi', name)",
                            "mode": "query", "options": {}}))
        got = [json.loads(ws.recv())]
        while got[-1]["status"] not in ("waiting-input", "finished", "error"):
            got.append(json.loads(ws.recv()))
        assert got[-1]["status"] == "waiting-input", got
        ws.send("replica")  # the input frame travels to the owner too
        got = [json.loads(ws.recv())]
        while got[-1]["status"] not in ("finished", "error"):
            got.append(json.loads(ws.recv()))
        assert "".join(v for f in got for k, v in f["console"] if k == "stdout") == \
            "hi replica\n"
        ws.close()
    finally:
        c1.delete("/session/streamed-1")


def test_sandbox_executions_work_through_either(clients: tuple[Client, Client]) -> None:
    c1, c2 = clients
    for c in (c1, c2):
        r = c.post("/api/v1/execute", json={"language": "python", "code": "print(6 * 7)"})
        assert r.status_code == 200 and r.json()["stdout"] == "42\n", r.text
    # A named session made through replica 1 keeps its state through replica 2.
    first = c1.post("/api/v1/execute", json={"language": "python", "code": "n = 7",
                                             "session_id": "sbx-1"})
    assert first.status_code == 200 and first.json()["exit_code"] == 0, first.text
    second = c2.post("/api/v1/execute", json={"language": "python", "code": "print(n * 6)",
                                              "session_id": "sbx-1"})
    assert second.json()["stdout"] == "42\n", second.text
    # An async execution accepted by replica 1, followed through replica 2.
    sub = c1.post("/api/v1/execute/async", json={"language": "python",
                                                  "code": "import time; time.sleep(1); print('done')"})
    eid = sub.json()["execution_id"]
    deadline = time.monotonic() + 60
    while True:
        status = c2.get(f"/api/v1/execute/status/{eid}").json()
        if status["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert status["status"] == "completed" and status["result"]["stdout"] == "done\n", status
    events = c2.get(f"/api/v1/execute/{eid}/events")
    assert events.status_code == 200 and "event: end" in events.text
    assert c2.delete("/api/v1/execute/session/sbx-1").status_code == 200


def test_a_job_session_works_through_either(clients: tuple[Client, Client]) -> None:
    c1, c2 = clients
    r = c1.post("/api/v1/sessions", json={"mode": "dedicated", "max_ttl": 120})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    jobs = []
    for c, code in ((c2, "acc = [1]"), (c1, "acc.append(2)"), (c2, "print(acc)")):
        j = c.post(f"/api/v1/sessions/{sid}/jobs", json={"code": code})
        assert j.status_code == 200, j.text
        jobs.append(j.json()["id"])
    deadline = time.monotonic() + 60
    while True:
        last = c2.get(f"/api/v1/jobs/{jobs[-1]}").json()
        if last["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert last["status"] == "completed" and last["stdout"] == "[1, 2]\n", last
    assert c2.get(f"/api/v1/sessions/{sid}").json()["id"] == sid
    assert c2.delete(f"/api/v1/sessions/{sid}/close").status_code == 204
    assert c1.get(f"/api/v1/sessions/{sid}").json()["state"] == "closed"


def test_a_keypairs_concurrency_holds_across_replicas(pair: tuple[Server, Server]) -> None:
    one, two = pair
    _, secret = one.new_keypair()  # concurrency 5, the default
    with Client(one.url, secret) as c1, Client(two.url, secret) as c2:
        made = []
        try:
            for i, c in enumerate((c1, c2, c1, c2, c1)):
                r = c.post("/kernel/create", json={"lang": "python",
                                                   "clientSessionToken": f"quota-{i}"})
                assert r.status_code == 201, r.text
                made.append(f"quota-{i}")
            # Three on replica 1, two on replica 2: the sixth is refused at either door.
            for c in (c1, c2):
                r = c.post("/kernel/create", json={"lang": "python",
                                                   "clientSessionToken": "quota-6"})
                assert r.status_code == 412, r.text
                assert "quota" in r.json()["type"]
            # A place freed on replica 2 is usable through replica 1.
            assert c1.delete("/kernel/quota-1").status_code == 200  # forwarded to replica 2
            made.remove("quota-1")
            r = c1.post("/kernel/create", json={"lang": "python",
                                                "clientSessionToken": "quota-6"})
            assert r.status_code == 201, r.text
            made.append("quota-6")
        finally:
            for name in made:
                c1.delete(f"/kernel/{name}")


def submit(client: Client, sid: str, code: str) -> str:
    r = client.post(f"/api/v1/sessions/{sid}/jobs", json={"code": code})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def job(client: Client, job_id: str) -> dict[str, object]:
    r = client.get(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def status_of(client: Client, job_id: str) -> object:
    """A job's status; None while its owner is unreachable (dead, its lease not yet out)."""
    r = client.get(f"/api/v1/jobs/{job_id}")
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    return r.json()["status"]


def wait_for(what: str, check: object, timeout: float) -> float:
    """Poll ``check()`` until true; returns when (monotonic). Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if check():  # type: ignore[operator]
            return time.monotonic()
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def test_kill_9_of_a_replica_hands_its_work_over_once(tmp_path: pytest.TempPathFactory,
                                                       pg_url: str) -> None:
    data = tmp_path / "data"  # type: ignore[operator]
    lease = float(LEASE_S)
    with run_server(data, database_url=pg_url, lease_s=LEASE_S) as one, \
            run_server(data, database_url=pg_url, lease_s=LEASE_S) as two:
        c1, c2 = Client(one.url, one.secret_key), Client(two.url, one.secret_key)
        # Replica 1 owns a dedicated job session: one job running, three queued behind it.
        sid = c1.post("/api/v1/sessions", json={"mode": "dedicated", "max_ttl": 600}).json()["id"]
        # (A kernel re-adopted in the middle of a job goes on running its code: the queued jobs
        # wait behind it, as after a restart of a single server.)
        running = submit(c1, sid, "import time; time.sleep(20)")
        queued = [submit(c1, sid, f"print('job {i}')") for i in range(3)]
        wait_for("the first job runs", lambda: job(c1, running)["status"] == "running", 60)
        # …a Backend.AI session holding a variable…
        r = c1.post("/kernel/create", json={"lang": "python", "clientSessionToken": "survivor"})
        assert r.status_code == 201, r.text
        assert query(c1, "survivor", "x = 41")["status"] == "finished"
        # …and a job session whose max_ttl runs out after the failover.
        ttl = c1.post("/api/v1/sessions", json={"mode": "dedicated", "max_ttl": 15}).json()["id"]
        first = submit(c1, ttl, "print('starts the max_ttl clock')")
        wait_for("the TTL session's job ends", lambda: job(c1, first)["status"] == "completed",
                 60)

        # A third replica races replica 2 for the dead one's work.
        with run_server(data, database_url=pg_url, lease_s=LEASE_S) as three:
            c3 = Client(three.url, one.secret_key)
            one.process.kill()  # SIGKILL: no goodbye, the lease just stops being renewed
            one.process.wait()
            killed = time.monotonic()
            # Until its lease runs out the dead owner is still the owner: 503, retry shortly.
            # Either is right: on a loaded machine the lease may have run out already (200).
            assert c2.get(f"/api/v1/jobs/{queued[0]}").status_code in (200, 503)
            done = wait_for("the queued jobs run elsewhere", lambda: all(
                status_of(c2, q) == "completed" for q in queued), lease * 3 + 60)
            print(f"failover: queued jobs done {done - killed:.1f} s after the kill "
                  f"(lease {lease:g} s)")
            # The dead replica's kernel, re-adopted by a survivor on this host: state intact.
            assert query(c2, "survivor", "print(x + 1)")["console"] == [["stdout", "42\n"]]
            assert query(c3, "survivor", "print(x + 2)")["console"] == [["stdout", "43\n"]]
            lost = job(c3, running)
            assert lost["status"] == "failed" and "lost" in str(lost["stderr"]), lost
            assert [job(c3, q)["stdout"] for q in queued] == [f"job {i}\n" for i in range(3)]
            wait_for("the max_ttl fires", lambda: c2.get(f"/api/v1/sessions/{ttl}").json()[
                "state"] == "closed", 60)
            closed = c3.get(f"/api/v1/sessions/{ttl}").json()
            assert "max_ttl" in closed["state_reason"], closed
            time.sleep(lease)  # a second firing, were there one, would come within this
            logs = two.log() + three.log()
            # Each queued job started exactly once in the cluster, on one replica.
            for q in queued:
                assert logs.count(f"job {q} of session") == 1, q
            assert logs.count(f"job session {ttl} closed") == 1
            assert [t["status"] for t in closed["timestamps"]].count("closed") == 1


def test_the_rate_limit_holds_across_replicas(tmp_path: pytest.TempPathFactory,
                                              pg_url: str) -> None:
    data = tmp_path / "data"  # type: ignore[operator]
    with run_server(data, database_url=pg_url, rate_limit="3") as one, \
            run_server(data, database_url=pg_url, rate_limit="3") as two:
        c1, c2 = Client(one.url, one.secret_key), Client(two.url, one.secret_key)
        body = {"language": "python", "code": "print(1)"}
        for c in (c1, c2, c1):
            r = c.post("/api/v1/execute", json=body)
            assert r.status_code == 200, r.text
        # Three in this minute, two on replica 1 and one on replica 2: the fourth is refused
        # at either door, though neither replica alone has seen three.
        for c in (c2, c1):
            r = c.post("/api/v1/execute", json=body)
            assert r.status_code == 429, r.text


def test_scheduled_work_has_one_doer_that_a_survivor_takes_over(pg_url: str) -> None:
    from bridge.replicas import Replicas
    from bridge.store.postgres import PostgresStore

    async def scenario() -> None:
        stores = [PostgresStore(pg_url) for _ in range(2)]
        for s in stores:
            await s.open()
        try:
            a, b = (Replicas(s, f"http://r{i}", replica_id=f"r{i}") for i, s in
                    enumerate(stores))
            # Rounds every 0.4 s: the first to try does the work, every round, alone.
            for _ in range(3):
                assert (await a.turn("prune", 0.4), await b.turn("prune", 0.4)) == (True, False)
                await asyncio.sleep(0.4)
            await asyncio.sleep(0.7)  # a stops (dies): its hold runs out after 1.5 rounds
            assert await b.turn("prune", 0.4) is True
            assert await a.turn("prune", 0.4) is False  # and stays b's
        finally:
            for s in stores:
                await s.close()

    asyncio.run(scenario())


def test_a_folder_outlives_a_replica_that_stops_beside_it(tmp_path: pytest.TempPathFactory,
                                                          pg_url: str) -> None:
    data = tmp_path / "data"  # type: ignore[operator]
    with run_server(data, database_url=pg_url) as one:
        c1 = Client(one.url, one.secret_key)
        with run_server(data, database_url=pg_url) as two:
            c2 = Client(two.url, one.secret_key)
            assert c1.post("/folders", json={"name": "shared-f"}).status_code == 201
            up = c2.post("/folders/shared-f/upload", files=[("src", ("kept.txt", b"kept\n"))])
            assert up.status_code == 201, up.text
        # Replica 2 stopped; replica 1, on the same host, still serves the folder's files
        # (the folder's filesystem stays mounted while a replica here runs).
        r = c1.get("/folders/shared-f/download_single", params={"file": "kept.txt"})
        assert r.status_code == 200 and r.content == b"kept\n", r.text
        assert c1.delete("/folders/shared-f").status_code == 204
