"""Units over a real directory: the download budget (headers and entries counted, measured size
equal to what is streamed), setuid bits, the tree growing mid-stream, listing pages, and the
mapping of "no space" errors to 507."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import sqlite3
import tarfile
from pathlib import Path

import pytest

from api.backendai.errors import BACKENDAI
from api.jobs.errors import IBM
from api.jupyter.errors import JUPYTER
from api.sandbox.errors import SANDBOX
from bridge import downloads, files
from bridge.disk import disk_full
from bridge.errors import DiskFull


def area(root: Path) -> files.Area:
    return files.Area(root=root, label="/home/work")


async def fetch(a: files.Area, paths: list[str]) -> tuple[downloads.Download, list[bytes]]:
    d = await downloads.tar_archives(a, paths)
    out = []
    for archive in d.archives:
        stream, chunks = archive.stream(), []
        try:
            async for chunk in stream:
                chunks.append(chunk)
        finally:
            stream.close()
        out.append(b"".join(chunks))
    return d, out


def test_headers_count_against_the_byte_budget(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(300):
        (many / (f"{i:03d}-" + "x" * 150)).touch()
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 100 * 1024)
    # No data at all, yet 300 headers with long-name records are well over 100 KiB.
    with pytest.raises(downloads.DownloadTooLarge, match="tar headers included"):
        asyncio.run(fetch(area(tmp_path), ["many"]))
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 10 * 1024 * 1024)
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_ENTRIES", 100)
    with pytest.raises(downloads.DownloadTooLarge, match="more than 100 entries"):
        asyncio.run(fetch(area(tmp_path), ["many"]))


def test_measured_size_is_what_is_streamed(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("hello")
    (d / "sub" / "big.bin").write_bytes(os.urandom(700_000))
    (d / ("é" * 120)).write_text("long non-ascii name")
    (d / "suid").write_text("#!/bin/sh\n")
    os.chmod(d / "suid", 0o6755)
    os.symlink("/etc/shadow", d / "link")
    os.mkfifo(d / "fifo")
    download, (raw,) = asyncio.run(fetch(area(tmp_path), ["d"]))
    assert download.size == len(raw) and len(raw) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("d/sub/big.bin").read() == (d / "sub" / "big.bin").read_bytes()  # type: ignore[union-attr]
    assert members["d/suid"].mode == 0o755
    assert members["d/link"].issym() and members["d/link"].linkname == "/etc/shadow"
    assert "d/fifo" not in members and f"d/{'é' * 120}" in members
    assert download.entries == len(members)


def test_a_tree_that_grows_mid_stream_is_cut(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 1000)
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 20 * 1024)

    async def main() -> None:
        download = await downloads.tar_archives(area(tmp_path), ["d"])
        (d / "f").write_bytes(b"x" * 100_000)  # user code writes on after admission
        stream = download.archives[0].stream()
        try:
            with pytest.raises(downloads.DownloadAborted):
                async for _ in stream:
                    pass
        finally:
            stream.close()

    asyncio.run(main())


def test_single_file_refuses_directories_and_top(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "f").write_bytes(b"data")
    for path in ("", ".", "dir", "/home/work"):
        with pytest.raises(files.InvalidRequest):
            asyncio.run(downloads.single_file(area(tmp_path), path))

    async def read() -> bytes:
        _, _, stream = await downloads.single_file(area(tmp_path), "f")
        try:
            return b"".join([c async for c in stream])
        finally:
            stream.close()

    assert asyncio.run(read()) == b"data"


def test_listing_pages_by_name(tmp_path: Path) -> None:
    for i in range(2500):
        (tmp_path / f"{i:04d}").touch()
    page = asyncio.run(files.listing(area(tmp_path), "."))
    assert len(page.items) == 1000 and page.truncated and page.total == 2500
    last = asyncio.run(files.listing(area(tmp_path), ".", after="1999"))
    assert [i["filename"] for i in last.items][:2] == ["2000", "2001"]
    assert len(last.items) == 500 and not last.truncated
    with pytest.raises(files.UnsafePath):
        asyncio.run(files.listing(area(tmp_path), "\ud800"))


def test_no_space_is_507_in_every_dialect() -> None:
    causes: list[BaseException] = [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite3.OperationalError("database or disk is full"),
        DiskFull("low"),
    ]
    for exc in causes:
        assert isinstance(disk_full(exc), DiskFull)
        for dialect in (BACKENDAI, SANDBOX, IBM, JUPYTER):
            assert dialect.lookup(exc, 500)[0] == 507, (dialect.name, exc)
    assert disk_full(OSError(errno.EIO, "I/O error")) is None
    assert disk_full(sqlite3.OperationalError("no such table: x")) is None
