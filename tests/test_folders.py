"""Virtual folders through the real server: lifecycle, mounts (ro really read-only, rw outlives
the session), and sharing by invitation between two keypairs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .support import Client, Server, console_text, run_to_end


def fname() -> str:
    return "vf" + uuid.uuid4().hex[:8]


def create_folder(client: Client) -> str:
    name = fname()
    r = client.post("/folders", json={"name": name, "host": None, "usage_mode": "general"})
    assert r.status_code == 201, r.text
    return name


def names(client: Client) -> set[str]:
    r = client.get("/folders")
    assert r.status_code == 200
    return {f["name"] for f in r.json()}


def run(client: Client, session: str, code: str) -> list[dict[str, Any]]:
    return run_to_end(client, "/session", session, code)


@pytest.fixture
def invitee(server: Server) -> Iterator[tuple[Client, str]]:
    """A second keypair: its client and access key."""
    access, secret = server.new_keypair()
    with server.client(secret) as c:
        yield c, access


def test_folder_lifecycle(client: Client) -> None:
    name = create_folder(client)
    assert client.post("/folders", json={"name": name}).status_code == 409
    assert client.post("/folders", json={"name": "../x"}).status_code == 400
    parts = [("src", ("a.txt", b"alpha")), ("src", ("sub%2Fb.txt", b"beta"))]
    assert client.post(f"/folders/{name}/upload", files=parts).status_code == 201
    info = client.get(f"/folders/{name}").json()
    assert info["numFiles"] == 2 and info["is_owner"] is True and info["permission"] == "rw"
    assert info["name"] == name and info["created"]
    listing = client.get(f"/folders/{name}/files", json={"path": "sub"}).json()
    assert [f["filename"] for f in json.loads(listing["files"])] == ["b.txt"]
    r = client.get(f"/folders/{name}/download_single", params={"file": "sub/b.txt"})
    assert r.content == b"beta"
    r = client.post(f"/folders/{name}/upload", files=[("src", ("..%2Fout.txt", b"x"))])
    assert r.status_code == 400
    # paging object (seed 002)
    second = create_folder(client)
    paged = client.get("/folders", params={"size": 1, "index": 0}).json()
    assert paged["paging"]["count"] >= 2 and len(paged["items"]) == 1
    assert client.delete(f"/folders/{name}").status_code == 204
    assert client.get(f"/folders/{name}").status_code == 404
    assert name not in names(client)
    assert client.delete(f"/folders/{second}").status_code == 204


def test_rw_mount_keeps_what_the_session_wrote(client: Client) -> None:
    folder = create_folder(client)
    session = "m-" + uuid.uuid4().hex[:8]
    r = client.post("/session", json={"lang": "python", "name": session,
                                      "config": {"mounts": [f"{folder}:data"]}})
    assert r.status_code == 201, r.text
    out = run(client, session, "open('/home/work/data/result.txt', 'w').write('kept')\n"
                               "print(open('/home/work/data/result.txt').read())")
    assert console_text(out, "stdout") == "kept\n"
    # uploads through the session never land in a mounted folder (seed 000)
    r = client.post(f"/session/{session}/upload", files=[("src", ("data%2Fx.txt", b"x"))])
    assert r.status_code == 403
    # a mounted folder is not deleted from under its session
    assert client.delete(f"/folders/{folder}").status_code == 409
    assert client.delete(f"/session/{session}").status_code == 200
    r = client.get(f"/folders/{folder}/download_single", params={"file": "result.txt"})
    assert r.status_code == 200 and r.content == b"kept"
    assert client.delete(f"/folders/{folder}").status_code == 204


def test_mount_errors(client: Client) -> None:
    r = client.post("/session", json={"lang": "python", "name": "m-" + uuid.uuid4().hex[:8],
                                      "mounts": ["no-such-folder"]})
    assert r.status_code == 404
    r = client.post("/session", json={"lang": "python", "name": "m-" + uuid.uuid4().hex[:8],
                                      "config": {"mounts": [f"f{i}" for i in range(6)]}})
    assert r.status_code == 400


def test_invitation_ro_share(client: Client, invitee: tuple[Client, str],
                             server: Server) -> None:
    other, access = invitee
    folder = create_folder(client)
    client.post(f"/folders/{folder}/upload", files=[("src", ("data.txt", b"shared data"))])
    assert folder not in names(other)
    r = client.post(f"/folders/{folder}/invite", json={"perm": "ro", "user_ids": [access]})
    assert r.status_code == 201, r.text
    (inv_id,) = r.json()["invited_ids"]
    # invited is not accepted: still invisible, not mountable
    assert folder not in names(other)
    assert other.get(f"/folders/{folder}").status_code == 404
    invitations = other.get("/folders/invitations/list").json()["invitations"]
    (inv,) = [i for i in invitations if i["id"] == inv_id]
    assert inv["permission"] == "ro" and inv["state"] == "pending" and inv["numFiles"] == 1
    assert inv["inviter"] == server.access_key and inv["vfolder_id"]
    session = "s-" + uuid.uuid4().hex[:8]
    assert other.post("/session", json={"lang": "python", "name": session,
                                        "mounts": [folder]}).status_code == 404
    assert other.post("/folders/invitations/accept", json={"inv_id": inv_id}).status_code == 200
    (item,) = [f for f in other.get("/folders").json() if f["name"] == folder]
    assert item["is_owner"] is False and item["permission"] == "ro"
    # ro: the API refuses writes, and so does the sandbox
    r = other.post(f"/folders/{folder}/upload", files=[("src", ("new.txt", b"x"))])
    assert r.status_code == 403
    assert other.delete(f"/folders/{folder}").status_code == 403
    r = other.post("/session", json={"lang": "python", "name": session, "mounts": [folder]})
    assert r.status_code == 201, r.text
    try:
        out = run(other, session, f"print(open('{folder}/data.txt').read())\n"
                                  "try:\n"
                                  f"    open('{folder}/new.txt', 'w').write('x')\n"
                                  "except OSError as e:\n"
                                  "    print(type(e).__name__, e.errno)")
        assert console_text(out, "stdout") == "shared data\nOSError 30\n"  # EROFS
    finally:
        other.delete(f"/session/{session}")
    listing = json.loads(client.get(f"/folders/{folder}/files").json()["files"])
    assert [f["filename"] for f in listing] == ["data.txt"]
    assert other.post("/folders/invitations/accept", json={"inv_id": inv_id}).status_code == 404


def test_rejected_invitation_never_shows(client: Client, invitee: tuple[Client, str],
                                        server: Server) -> None:
    other, access = invitee
    folder = create_folder(client)
    r = client.post(f"/folders/{folder}/invite", json={"perm": "rw", "user_ids": [access]})
    (inv_id,) = r.json()["invited_ids"]
    assert other.post("/folders/invitations/reject", json={"inv_id": inv_id}).status_code == 200
    assert other.get("/folders/invitations/list").json()["invitations"] == []
    assert folder not in names(other)
    assert other.post("/folders/invitations/accept", json={"inv_id": inv_id}).status_code == 404
    # only the owner invites; unknown keypairs and permissions are refused
    assert other.post(f"/folders/{folder}/invite",
                      json={"perm": "ro", "user_ids": [server.access_key]}).status_code == 404
    assert client.post(f"/folders/{folder}/invite",
                       json={"perm": "ro", "user_ids": ["AKIANOSUCHKEY"]}).status_code == 404
    assert client.post(f"/folders/{folder}/invite",
                       json={"perm": "wd", "user_ids": [access]}).status_code == 400
