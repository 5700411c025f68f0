"""Hostile tenants and the disk: quotas per session and per folder, the kernels' other writable
places, the server's own disk running low (507), and downloads and listings that stay bounded.

Each test is an attacker keypair doing its worst through the real server and, where it matters,
a victim keypair that must not notice. Figures are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bridge.doctor import cgroups

from .support import Client, Server, console_text, create_session, run_server, run_to_end

GIB = 1024 ** 3
MIB = 1024 ** 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="disk quotas need root (loop mounts)")


def session(client: Client, **body: Any) -> str:
    return create_session(client, "s", **body)


def sh(client: Client, name: str, script: str) -> str:
    """Run a shell script in the session; its stdout and stderr, merged."""
    code = ("import subprocess\nr = subprocess.run(" + repr(script) + ", shell=True, "
            "capture_output=True, text=True)\nprint(r.stdout + r.stderr)")
    results = run_to_end(client, "/session", name, code)
    return console_text(results, "stdout") + console_text(results, "stderr")


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with run_server(pool_python="1") as s:
        yield s


@pytest.fixture(scope="module")
def tenants(srv: Server) -> Iterator[tuple[Client, Client]]:
    _, attacker_secret = srv.new_keypair()
    _, victim_secret = srv.new_keypair()
    with srv.client(attacker_secret) as attacker, srv.client(victim_secret) as victim:
        yield attacker, victim


def test_session_disk_quota_holds_the_host_and_the_victim(
        srv: Server, tenants: tuple[Client, Client]) -> None:
    attacker, victim = tenants
    mine, theirs = session(attacker), session(victim)
    free_before = shutil.disk_usage(srv.data_dir).free
    t0 = time.monotonic()
    out = sh(attacker, mine, "dd if=/dev/zero of=/home/work/big bs=1M count=3072; echo rc=$?")
    dd_s = time.monotonic() - t0
    assert "No space left on device" in out and "rc=0" not in out, out
    dd_drop = free_before - shutil.disk_usage(srv.data_dir).free
    out = sh(attacker, mine, "rm -f /home/work/big; fallocate -l 6G /home/work/huge; echo rc=$?")
    assert "No space left on device" in out and "rc=1" in out, out
    fallocate_drop = free_before - shutil.disk_usage(srv.data_dir).free
    print(f"\nFIGURE host free-space drop: dd 3 GiB {dd_drop / GIB:.3f} GiB ({dd_s:.1f} s), "
          f"fallocate 6 GiB {fallocate_drop / GIB:.3f} GiB")
    assert dd_drop < 1.1 * GIB and fallocate_drop < 1.1 * GIB
    # The victim's session works and writes, while the attacker's is full.
    t0 = time.monotonic()
    out = sh(victim, theirs, "head -c 10485760 /dev/zero > /home/work/ten; ls -l /home/work/ten;"
                             " echo 1")
    assert "10485760" in out and "No space" not in out, out
    print(f"FIGURE victim write of 10 MiB + print: {time.monotonic() - t0:.2f} s")
    # Destroying the attacker's session gives the space back.
    assert attacker.delete(f"/session/{mine}").status_code == 200
    regained = shutil.disk_usage(srv.data_dir).free - (free_before - fallocate_drop)
    assert regained > 0.9 * fallocate_drop
    assert not list((srv.data_dir / "disks").glob("*" + mine + "*"))


def test_other_writable_places_are_bounded(srv: Server, tenants: tuple[Client, Client]) -> None:
    """The kernel's socket dir is on the host: a 1 MiB tmpfs keeps it from filling /tmp."""
    attacker, _ = tenants
    name = session(attacker)
    code = """
import os, errno
from ipykernel.connect import get_connection_file
d = os.path.join(os.path.dirname(get_connection_file()), "s")  # the kernel's sockets' dir
try:
    with open(os.path.join(d, "fill"), "wb") as f:
        for _ in range(64):
            f.write(b"x" * 1024 * 1024)
            f.flush()
    print("filled")
except OSError as e:
    print("refused", errno.errorcode[e.errno])
"""
    out = console_text(run_to_end(attacker, "/session", name, code), "stdout")
    assert "refused ENOSPC" in out, out


@pytest.mark.parametrize("place", ["/dev/shm", "/tmp"])
def test_memory_backed_places_are_capped_by_memory(
        srv: Server, tenants: tuple[Client, Client], place: str) -> None:
    """/tmp and /dev/shm are tmpfs in the sandbox: their pages count against the kernel's
    memory cap, so filling them ends the kernel, not the host's disk or memory."""
    attacker, _ = tenants
    name = session(attacker, limits={"maxMem": 256 * 1024})
    free_before = shutil.disk_usage(srv.data_dir).free
    results = run_to_end(attacker, "/session", name,
                         f"import subprocess\nsubprocess.run('dd if=/dev/zero of={place}/f "
                         "bs=1M count=700', shell=True)\nprint('survived')")
    out = console_text(results, "stdout") + console_text(results, "stderr")
    if cgroups().verdict == "ok":  # tmpfs pages are charged to the kernel's memory cgroup
        assert "survived" not in out and results[-1]["exitCode"] == 130, results[-1]
    else:  # RLIMIT_AS does not count tmpfs pages: only the tmpfs's own size stops dd
        assert "No space" in out, out
    assert free_before - shutil.disk_usage(srv.data_dir).free < 200 * MIB
    attacker.delete(f"/session/{name}")


def test_inode_cap(tmp_path: Path) -> None:
    with run_server(tmp_path / "data", session_inodes="2048", pool_python="0") as s, \
            s.client() as c:
        name = session(c)
        code = """
import errno, os
os.mkdir("many")
n = 0
try:
    while n < 10000:
        open(f"many/{n}", "w").close()
        n += 1
except OSError as e:
    print("stopped", n, errno.errorcode[e.errno])
"""
        out = console_text(run_to_end(c, "/session", name, code), "stdout")
        assert out.startswith("stopped") and "ENOSPC" in out, out
        assert 1900 < int(out.split()[1]) <= 2048


def test_folder_quota(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data, folder_disk_mb="64", pool_python="0") as s, s.client() as c:
        owner = s.secret_key
        assert c.post("/folders", json={"name": "data"}).status_code == 201
        name = session(c, config={"mounts": ["data"]})
        free_before = shutil.disk_usage(s.data_dir).free
        out = sh(c, name, "echo kept > /home/work/data/keep;"
                          " dd if=/dev/zero of=/home/work/data/fill bs=1M count=200; echo rc=$?")
        assert "No space left on device" in out and "rc=1" in out, out
        assert free_before - shutil.disk_usage(s.data_dir).free < 80 * MIB
        # Through the API too: the full folder refuses an upload with a 507, not a 500.
        r = c.post("/folders/data/upload", files=[("src", ("more.bin", b"x" * 900_000))])
        assert r.status_code == 507 and r.json()["type"].endswith("insufficient-storage"), r.text
    from bridge.disk import mounted

    assert not [p for p in mounted() if p.startswith(os.path.realpath(data))]  # clean stop
    # The folder outlives the server: its image is mounted again at the next start.
    with run_server(data, folder_disk_mb="64", pool_python="0") as s, s.client(owner) as c:
        r = c.get("/folders/data/download_single", params={"file": "keep"})
        assert r.status_code == 200 and r.content == b"kept\n", r.text
        assert c.delete("/folders/data").status_code == 204
        assert not list((data / "disks").glob("vfolders-*"))


# -- downloads and listings ------------------------------------------------------------------

@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Client, str]]:
    """A session holding 150k empty files with long names in many/ (as the review made)."""
    data = tmp_path_factory.mktemp("crowded") / "data"
    with run_server(data, session_inodes="200000", pool_python="0") as s, s.client() as c:
        name = session(c)
        code = """
import os
os.mkdir("many")
for i in range(150_000):
    open(f"many/{i:06d}-" + "x" * 200, "w").close()
os.mkdir("few")
for i in range(300):
    open(f"few/{i:03d}-" + "y" * 200, "w").close()
with open("few/exe", "w") as f:
    f.write("#!/bin/sh\\n")
os.chmod("few/exe", 0o6755)
print(len(os.listdir("many")), oct(os.stat("few/exe").st_mode))
"""
        t0 = time.monotonic()
        out = console_text(run_to_end(c, "/session", name, code), "stdout")
        assert out.split()[0] == "150000", out
        print(f"\nFIGURE made 150k files in {time.monotonic() - t0:.1f} s; mode {out.split()[1]}")
        yield s, c, name


def server_rss(s: Server) -> int:
    return int(psutil.Process(s.process.pid).memory_info().rss)


def test_listing_of_150k_files_is_bounded(crowded: tuple[Server, Client, str]) -> None:
    s, c, name = crowded
    rss = server_rss(s)
    t0 = time.monotonic()
    r = c.get(f"/session/{name}/files", json={"path": "many"})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    page = json.loads(body["files"])
    print(f"\nFIGURE listing of 150k: {len(r.content)} bytes, {len(page)} entries, "
          f"{took:.2f} s, server RSS +{(server_rss(s) - rss) / MIB:.1f} MiB")
    assert len(page) == 1000 and body["truncated"] is True and body["total"] == 150_000
    assert len(r.content) < 1024 * 1024
    assert [p["filename"][:6] for p in page[:2]] == ["000000", "000001"]
    # Paging on from the last name of the page.
    r = c.get(f"/session/{name}/files", params={"path": "many", "after": page[-1]["filename"],
                                                "limit": "5"})
    nxt = json.loads(r.json()["files"])
    assert [p["filename"][:6] for p in nxt] == ["001000", "001001", "001002", "001003",
                                                "001004"]
    r = c.get(f"/session/{name}/files", params={"path": "many", "limit": "5000"})
    assert r.status_code == 400, r.text


def test_download_of_150k_files_is_refused_fast(crowded: tuple[Server, Client, str]) -> None:
    s, c, name = crowded
    rss = server_rss(s)
    t0 = time.monotonic()
    r = c.get(f"/session/{name}/download", json={"files": ["many"]})
    took = time.monotonic() - t0
    print(f"\nFIGURE download of 150k: {r.status_code} in {took:.2f} s, "
          f"server RSS +{(server_rss(s) - rss) / MIB:.1f} MiB: {r.json()['msg']}")
    assert r.status_code == 400 and "entries" in r.json()["msg"]
    assert server_rss(s) - rss < 100 * MIB


def test_download_streams_counts_headers_and_drops_setuid(
        crowded: tuple[Server, Client, str]) -> None:
    _, c, name = crowded
    t0 = time.monotonic()
    with c.get(f"/session/{name}/download", json={"files": ["few"]}, stream=True) as r:
        assert r.status_code == 200, r.text
        assert r.headers.get("Transfer-Encoding") == "chunked"
        raw = r.raw.read()
    took = time.monotonic() - t0
    boundary = r.headers["Content-Type"].split("boundary=")[1]
    part = raw.split(f"--{boundary}".encode())[1]
    tar_bytes = part.split(b"\r\n\r\n", 1)[1][:-2]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    print(f"\nFIGURE download of 301 files: {len(tar_bytes)} tar bytes (data 10 bytes) in "
          f"{took:.2f} s")
    assert len(members) == 302  # the dir and its files
    assert members["few/exe"].mode == 0o755  # setuid and setgid dropped
    assert len(tar_bytes) > 300 * 1024  # headers (with long-name records) are most of it


def test_big_downloads_stream_without_growing_the_server(
        crowded: tuple[Server, Client, str]) -> None:
    s, c, name = crowded
    run_to_end(c, "/session", name, "with open('big.bin', 'wb') as f:\n"
                                    "    f.write(bytes(60 * 1024 * 1024))")
    for route, body in (("download", {"files": ["big.bin"]}),
                        ("download_single", {"file": "big.bin"})):
        rss, peak = server_rss(s), 0
        t0 = time.monotonic()
        got = 0
        with c.get(f"/session/{name}/{route}", json=body, stream=True) as r:
            assert r.status_code == 200, r.text
            for chunk in r.iter_content(1024 * 1024):
                got += len(chunk)
                peak = max(peak, server_rss(s) - rss)
        print(f"\nFIGURE {route} of 60 MiB: {got} bytes in {time.monotonic() - t0:.2f} s, "
              f"server RSS peak +{peak / MIB:.1f} MiB")
        assert got >= 60 * MIB and peak < 30 * MIB


def test_download_single_refuses_dirs_and_empty_paths(crowded: tuple[Server, Client, str]
                                                      ) -> None:
    _, c, name = crowded
    for path in ("", ".", "few", "/home/work"):
        r = c.get(f"/session/{name}/download_single", json={"file": path})
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert r.headers["Content-Type"] == "application/problem+json"
    r = c.get(f"/session/{name}/download_single", params={"file": "few/exe"})
    assert r.status_code == 200 and r.content == b"#!/bin/sh\n"
    assert r.headers["Content-Length"] == "10"


# -- the server's own disk -------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 640 MiB filesystem for a data dir (serve wants 512 MiB free to start), so filling
    it harms nothing else."""
    image, mnt = tmp_path / "small.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(640 * MIB)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_low_server_disk_is_507_in_every_dialect(small_disk: Path) -> None:
    env = {"session_disk_mb": "32", "folder_disk_mb": "32", "disk_reserve_mb": "24",
           "pool_python": "0"}
    with run_server(small_disk / "data", **env) as s, s.client() as c:
        filler = small_disk / "filler"
        free = shutil.disk_usage(small_disk).free
        subprocess.run(["fallocate", "-l", str(free - 8 * MIB), str(filler)], check=True)
        r = c.post("/session", json={"lang": "python"})
        assert r.status_code == 507, r.text
        assert r.json()["type"].endswith("/insufficient-storage")
        assert "low on disk" in r.json()["msg"]
        r = c.post("/folders", json={"name": "f"})
        assert r.status_code == 507, r.text
        r = c.post("/api/v1/execute", json={"language": "python", "code": "print(1)"})
        assert r.status_code == 507 and "low on disk" in r.json()["detail"], r.text
        r = c.post("/api/kernels", json={"name": "python3"})
        assert r.status_code == 507 and r.json()["reason"] == "Insufficient Storage", r.text
        # Space comes back: so does service.
        filler.unlink()
        r = c.post("/session", json={"lang": "python"})
        assert r.status_code == 201, r.text


def test_unknown_signature_methods_are_401(srv: Server) -> None:
    import requests

    from api.auth import sign

    for method in ("HMAC-SHAKE_128", "HMAC-SHA1", "HMAC-MD5", "RSA-SHA256", "HMAC-SHA256"):
        date = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        from datetime import datetime

        host = f"127.0.0.1:{srv.port}"
        sig = sign(method="GET", path="/folders", raw_date=date,
                   date=datetime.fromisoformat(date), host=host,
                   content_type="application/json", version="v5.20191215", body=b"",
                   secret=srv.secret_key, hash_type="sha256")
        r = requests.get(srv.url + "/folders", timeout=30, headers={
            "Authorization": f"BackendAI signMethod={method}, credential={srv.access_key}:{sig}",
            "Date": date, "X-BackendAI-Version": "v5.20191215",
            "Content-Type": "application/json"})
        expected = 200 if method == "HMAC-SHA256" else 401
        assert r.status_code == expected, (method, r.status_code, r.text)


def test_folder_made_without_quota_gets_one_at_next_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with run_server(data, folder_disk_mb="0", pool_python="0") as s, s.client() as c:
        owner = s.secret_key
        assert c.post("/folders", json={"name": "old"}).status_code == 201
        r = c.post("/folders/old/upload", files=[("src", ("a/b.txt", b"before"))])
        assert r.status_code == 201, r.text
        (host,) = (data / "vfolders").iterdir()
        assert not os.path.ismount(host)
    with run_server(data, folder_disk_mb="64", pool_python="0") as s, s.client(owner) as c:
        assert os.path.ismount(host)
        r = c.get("/folders/old/download_single", params={"file": "a/b.txt"})
        assert r.status_code == 200 and r.content == b"before"
        name = session(c, config={"mounts": ["old"]})
        out = sh(c, name, "dd if=/dev/zero of=/home/work/old/fill bs=1M count=100; echo rc=$?")
        assert "No space left on device" in out and "rc=1" in out, out


def test_folder_and_invitation_floods_are_capped(srv: Server) -> None:
    """Each folder is an image and a loop device, each invitation a row the invitee lists:
    one keypair may not make them without end."""
    from bridge.folders import MAX_FOLDERS, MAX_PENDING_INVITATIONS

    _, attacker_secret = srv.new_keypair()
    victim_access, _ = srv.new_keypair()
    with srv.client(attacker_secret) as attacker:
        codes = [attacker.post("/folders", json={"name": f"f{i}"}).status_code
                 for i in range(MAX_FOLDERS + 1)]
        assert codes == [201] * MAX_FOLDERS + [400], codes
        invite = {"perm": "ro", "user_ids": [victim_access]}
        codes = [attacker.post("/folders/f0/invite", json=invite).status_code
                 for _ in range(MAX_PENDING_INVITATIONS + 1)]
        assert codes == [201] * MAX_PENDING_INVITATIONS + [409], codes
        for i in range(MAX_FOLDERS):
            assert attacker.delete(f"/folders/f{i}").status_code == 204


def owner_of(ipc_dir: str) -> int:
    """The pid of the server that runs the kernel of a kernel's IPC dir (bridge/kernels.py)."""
    try:
        return int((Path(ipc_dir) / "owner").read_text().split()[0])
    except (OSError, ValueError):
        return 0


def test_leftovers_of_a_killed_server_are_swept_at_start(tmp_path: Path) -> None:
    """What no live session owns is swept at the next start (a pooled kernel's dir, mount and
    IPC dir); a session's are kept: it is re-adopted (issue 15)."""
    import json
    import sqlite3

    from bridge.disk import mounted

    data = tmp_path / "data"
    real = os.path.realpath(data)
    with run_server(data, pool_python="1") as s, s.client() as c:
        name = session(c)
        with sqlite3.connect(data / "kernel-bridge.sqlite3") as db:
            config = db.execute("SELECT config FROM sessions WHERE name=?", (name,)).fetchone()
        kept = os.path.realpath(json.loads(config[0])["workdir"])
        deadline = time.monotonic() + 60  # the pool refills: a leftover-to-be
        while time.monotonic() < deadline:
            ours = [p for p in mounted() if p.startswith(real + "/sessions/")]
            ipc = [p for p, (_, src) in mounted().items()
                   if src == "kb-ipc-kernel" and owner_of(p) == s.process.pid]
            if len(ours) == 2 and len(ipc) == 2:
                break
            time.sleep(0.2)
        assert kept in ours and len(ours) == 2 and len(ipc) == 2
        s.process.kill()
        s.process.wait()
        time.sleep(1)  # its kernels live on with their keepers: the next start sweeps them
        assert all(p in mounted() for p in ours)  # the killed server could not clean up
        with run_server(data, pool_python="0"):
            left = mounted()
            assert kept in left  # the session's, adopted
            assert [p for p in ours if p in left] == [kept]
            assert len([p for p in ipc if p in left]) == 1  # the session kernel's
            assert [p.name for p in (data / "sessions").iterdir()] == [Path(kept).name]


def test_a_clean_stop_leaves_no_mount_even_mid_refill(tmp_path: Path) -> None:
    """Stopping while the pool is still making its dirs and starting its kernels: every
    filesystem made is unmounted and every image deleted (nothing left for the next start)."""
    import signal

    from bridge.disk import mounted

    data = tmp_path / "data"
    with run_server(data, pool_python="3") as s:
        time.sleep(0.5)
        s.process.send_signal(signal.SIGTERM)
        assert s.process.wait(timeout=60) == 0
        assert not [p for p in mounted() if p.startswith(os.path.realpath(data))]
        assert list((data / "disks").glob("*.img")) == []
