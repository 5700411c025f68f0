"""Session files through the real server: upload, list, download, download_single, and every
path that must be refused without anything being written or read."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import pytest

from .support import Client, Server, console_text, run_to_end


class Sess:
    def __init__(self, client: Client, name: str, workdir: Path) -> None:
        self.client, self.name, self.workdir = client, name, workdir
        self.base = f"/session/{name}"

    def upload(self, files: list[tuple[str, bytes]]) -> Any:
        parts = [("src", (n, d, "application/octet-stream")) for n, d in files]
        return self.client.post(f"{self.base}/upload", files=parts)

    def run(self, code: str) -> str:
        results = run_to_end(self.client, "/session", self.name, code)
        assert console_text(results, "stderr") == "", results
        return console_text(results, "stdout")

    def listing(self, path: str) -> Any:
        # the SDK's form: a GET with a JSON body
        return self.client.get(f"{self.base}/files", json={"path": path})


@pytest.fixture(scope="module")
def sess(server: Server) -> Iterator[Sess]:
    with server.client() as client:
        name = f"f-{uuid.uuid4().hex[:10]}"
        r = client.post("/session", json={"lang": "python", "name": name})
        assert r.status_code == 201, r.text
        yield Sess(client, name, server.data_dir / "sessions" / r.json()["sessionId"])
        client.delete(f"/session/{name}")


def tar_parts(response: Any) -> list[tarfile.TarFile]:
    """Split a multipart/mixed response the way aiohttp's reader does, one tar per part."""
    assert response.headers["Content-Type"].startswith("multipart/mixed; boundary=")
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + response.content)
    out = []
    for part in msg.iter_parts():
        assert part["Content-Encoding"] == "identity"
        assert part["Content-Transfer-Encoding"] == "binary"
        data = io.BytesIO(part.get_payload(decode=True))
        out.append(tarfile.open(fileobj=data))  # noqa: SIM115 - in memory, nothing to close
    return out


def test_upload_list_and_download_round_trip(sess: Sess) -> None:
    blob = os.urandom(200_000)
    r = sess.upload([("data%2Fblob.bin", blob), ("hello.txt", b"hi\n"),
                     ("/home/work/deep/er/x.txt", b"x")])
    assert r.status_code == 204, r.text
    # the kernel sees them under /home/work, directories created
    assert sess.run("import os\nprint(sorted(os.listdir('data')), open('deep/er/x.txt').read())"
                    ) == "['blob.bin'] x\n"
    body = sess.listing("data").json()
    assert body["errors"] == "" and body["abspath"] == "data"
    items = json.loads(body["files"])
    assert [(i["filename"], i["size"], i["mode"]) for i in items] == [
        ("blob.bin", len(blob), "-rw-r--r--")]
    assert {"ctime", "mtime", "atime"} <= items[0].keys()
    # the query-string form works too, and the root lists what the session wrote
    root = sess.client.get(f"{sess.base}/files", params={"path": "/home/work"})
    assert {"data", "hello.txt", "deep"} <= {i["filename"] for i in json.loads(root.json()["files"])}
    r = sess.client.get(f"{sess.base}/download", json={"files": ["data/blob.bin", "deep"]})
    assert r.status_code == 200
    blob_tar, deep_tar = tar_parts(r)
    assert blob_tar.extractfile("blob.bin").read() == blob  # type: ignore[union-attr]
    assert deep_tar.extractfile("deep/er/x.txt").read() == b"x"  # type: ignore[union-attr]
    single = sess.client.get(f"{sess.base}/download_single", params={"file": "hello.txt"})
    assert single.status_code == 200 and single.content == b"hi\n"


def test_upload_limits_write_nothing(sess: Sess) -> None:
    many = [(f"many/{i}.txt", b"1") for i in range(21)]
    r = sess.upload(many)
    assert r.status_code == 400 and "Too many files" in r.json()["msg"]
    big = [("small.txt", b"ok"), ("big.bin", b"\0" * (1024 * 1024 + 1))]
    r = sess.upload(big)
    assert r.status_code == 400 and "Too large file" in r.json()["msg"]
    assert not (sess.workdir / "many").exists()
    assert not (sess.workdir / "small.txt").exists()
    assert not (sess.workdir / "big.bin").exists()


@pytest.mark.parametrize("name", [
    "../escape.txt",
    "..%2Fescape.txt",  # percent-encoded, as the SDK encodes '/'
    "%2E%2E%2Fescape.txt",
    "ok/../../escape.txt",
    "/home/work/../escape.txt",
    "/tmp/escape.txt",
    "/etc/kb-escape.txt",
])
def test_escaping_upload_names_are_refused(sess: Sess, name: str) -> None:
    # a good file in the same request must not be written either: all or nothing
    r = sess.upload([("innocent.txt", b"x"), (name, b"evil")])
    assert r.status_code == 400, r.text
    assert r.json()["type"].endswith("/invalid-api-params")
    assert not (sess.workdir / "innocent.txt").exists()
    assert not (sess.workdir.parent / "escape.txt").exists()
    assert not Path("/etc/kb-escape.txt").exists() and not Path("/tmp/escape.txt").exists()


def test_symlinks_planted_by_user_code_are_never_followed(sess: Sess) -> None:
    # user code can point links anywhere; on the host they would resolve outside the sandbox
    target = sess.workdir.parent / f"outside-{uuid.uuid4().hex[:6]}"
    target.mkdir()
    (target / "secret.txt").write_text("host secret")
    sess.run(f"import os\nos.symlink({str(target)!r}, 'outdir')\n"
             f"os.symlink({str(target / 'secret.txt')!r}, 'secret.txt')\n"
             "os.symlink('/etc/passwd', 'passwd')")
    for name in ("outdir/planted.txt", "outdir%2Fplanted.txt", "secret.txt"):
        r = sess.upload([(name, b"evil")])
        assert r.status_code == 400, (name, r.text)
        assert "symbolic link" in r.json()["msg"]
    assert sorted(os.listdir(target)) == ["secret.txt"]
    assert (target / "secret.txt").read_text() == "host secret"
    for path in ("outdir", "outdir/secret.txt"):
        assert sess.listing(path).status_code == 400
    for files in (["secret.txt"], ["passwd"], ["outdir"], ["outdir/secret.txt"]):
        r = sess.client.get(f"{sess.base}/download", json={"files": files})
        assert r.status_code == 400, (files, r.status_code)
        assert b"host secret" not in r.content and b"root:" not in r.content
    r = sess.client.get(f"{sess.base}/download_single", json={"file": "passwd"})
    assert r.status_code == 400 and b"root:" not in r.content
    # a directory holding links is downloadable: the links go in as links, unfollowed
    sess.run("import os\nos.makedirs('box', exist_ok=True)\nos.symlink('/etc/passwd', 'box/pw')")
    (box,) = tar_parts(sess.client.get(f"{sess.base}/download", json={"files": ["box"]}))
    link = box.getmember("box/pw")
    assert link.issym() and link.linkname == "/etc/passwd"


@pytest.mark.parametrize("path", ["..", "../", "/etc", "/home/work/../..", "a/../../b"])
def test_reading_outside_is_refused(sess: Sess, path: str) -> None:
    assert sess.listing(path).status_code == 400
    r = sess.client.get(f"{sess.base}/download", json={"files": [path]})
    assert r.status_code == 400
    r = sess.client.get(f"{sess.base}/download_single", params={"file": path + "/x"})
    assert r.status_code == 400


def test_missing_paths_and_bad_requests(sess: Sess) -> None:
    assert sess.listing("no/such/dir").status_code == 404
    r = sess.client.get(f"{sess.base}/download", json={"files": ["nope.txt"]})
    assert r.status_code == 404
    r = sess.client.get(f"{sess.base}/download", json={"files": [f"{i}" for i in range(6)]})
    assert r.status_code == 400 and "Too many files" in r.json()["msg"]
    r = sess.client.post(f"{sess.base}/upload", data=b"not multipart")
    assert r.status_code == 400
    r = sess.client.get("/session/no-such-session/files", json={"path": "."})
    assert r.status_code == 404
