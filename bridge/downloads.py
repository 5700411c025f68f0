"""Downloads of a session's or a folder's files, streamed to the client within one budget.

A tar download makes two passes over the tree. The first only measures: it counts the entries
and the archive's exact size (each header with its long-name extension, the data and its
padding, the end blocks) and refuses, before a byte is sent, a download above
:data:`MAX_DOWNLOAD_BYTES` or :data:`MAX_DOWNLOAD_ENTRIES`. It stops at the first limit crossed,
so a directory of 150k files costs no more than the limit. The second pass writes the archive in
chunks in a worker thread, one chunk per pull: a slow client slows the walk, and the server holds
one chunk per download, never the archive. The tree may change between the passes (user code
runs on); the second pass holds the same limits and stops with :class:`DownloadAborted` rather
than send more than was admitted.

Members are regular files, directories and symbolic links (as links, never followed); fifos,
sockets and devices are left out. Modes lose their setuid and setgid bits and owners are 0, so
an archive unpacked by root plants no privileged binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BridgeError, InvalidRequest
from .files import Area, open_member

MAX_DOWNLOAD_FILES = 5  # paths per request (Backend.AI's limit)
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # every archive byte of one request, headers included
MAX_DOWNLOAD_ENTRIES = 10_000  # members of one request's archives
MAX_DEPTH = 64  # each level holds a descriptor while the walk is below it
CHUNK = 256 * 1024
_KEEP_MODE = 0o1777  # no setuid, no setgid
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


class DownloadTooLarge(InvalidRequest):
    pass


class DownloadAborted(BridgeError):
    """The tree grew past the budget while it was being sent; the response is cut short."""


@dataclass
class _Count:
    """Bytes and entries of one request, against the limits; ``error`` is what to raise."""

    error: type[BridgeError] = DownloadTooLarge
    bytes: int = 0
    entries: int = 0

    def add(self, nbytes: int, shown: str, entries: int = 1) -> None:
        self.bytes += nbytes
        self.entries += entries
        if self.entries > MAX_DOWNLOAD_ENTRIES:
            raise self.error(f"Download of {shown!r} has more than {MAX_DOWNLOAD_ENTRIES} "
                             "entries; download fewer files, or archive them in the session "
                             "first.")
        if self.bytes > MAX_DOWNLOAD_BYTES:
            raise self.error(f"Download of {shown!r} exceeds {MAX_DOWNLOAD_BYTES} bytes "
                             "(tar headers included).")


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padded(n: int, to: int = _BLOCK) -> int:
    return -(-n // to) * to


def _trailer(archive_bytes: int) -> int:
    """Bytes after the last member: two zero blocks, then padding to a whole record."""
    return _padded(archive_bytes + 2 * _BLOCK, _RECORD) - archive_bytes


def _members(fd: int, st: os.stat_result, arcname: str,
             depth: int = 0) -> Iterator[tuple[tarfile.TarInfo, int | None]]:
    """(member, descriptor of its data) in archive order, descriptors closed by the walk."""
    info = tarfile.TarInfo(arcname)
    info.mode, info.mtime = stat.S_IMODE(st.st_mode) & _KEEP_MODE, int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        yield info, fd
        return
    info.type = tarfile.DIRTYPE
    yield info, None
    if depth >= MAX_DEPTH:
        raise DownloadTooLarge(f"{arcname!r} is nested deeper than {MAX_DEPTH} directories.")
    with os.scandir(fd) as it:  # unsorted: sorting would hold every name of a huge directory
        for entry in it:
            name, child = entry.name, f"{arcname}/{entry.name}"
            try:
                cst = os.lstat(name, dir_fd=fd)
                if stat.S_ISLNK(cst.st_mode):
                    link = tarfile.TarInfo(child)
                    link.type, link.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=fd)
                    link.mtime = int(cst.st_mtime)
                    yield link, None
                    continue
                if not (stat.S_ISREG(cst.st_mode) or stat.S_ISDIR(cst.st_mode)):
                    continue  # sockets, fifos, devices: nothing to download
                cfd = os.open(name, _OPEN, dir_fd=fd)
            except OSError:
                continue  # vanished or swapped for a link meanwhile: skip it, never follow it
            try:
                cst = os.fstat(cfd)
                if stat.S_ISREG(cst.st_mode) or stat.S_ISDIR(cst.st_mode):
                    yield from _members(cfd, cst, child, depth + 1)
            finally:
                os.close(cfd)


def _measure(root: Path, parts: tuple[str, ...], shown: str, arcname: str,
             count: _Count) -> None:
    fd, st = open_member(root, parts, shown)
    try:
        size = 0
        for info, _ in _members(fd, st, arcname):
            n = len(_header(info)) + _padded(info.size)
            size += n
            count.add(n, shown)
        count.add(_trailer(size), shown, entries=0)
    finally:
        os.close(fd)


def _tar_chunks(root: Path, parts: tuple[str, ...], shown: str, arcname: str,
                count: _Count) -> Iterator[bytes]:
    fd, st = open_member(root, parts, shown)
    buf, size = bytearray(), 0
    try:
        for info, data_fd in _members(fd, st, arcname):
            head = _header(info)
            count.add(len(head) + _padded(info.size), shown)
            buf += head
            size += len(head) + _padded(info.size)
            left = info.size if data_fd is not None else 0
            while left:
                data = os.read(data_fd, min(CHUNK, left)) if data_fd is not None else b""
                # A file cut short meanwhile: zeros keep the archive well formed.
                data = data or bytes(min(CHUNK, left))
                buf += data
                left -= len(data)
                if len(buf) >= CHUNK:
                    yield bytes(buf)
                    buf.clear()
            buf += bytes(_padded(info.size) - info.size)
            if len(buf) >= CHUNK:
                yield bytes(buf)
                buf.clear()
        trailer = _trailer(size)
        count.add(trailer, shown, entries=0)
        buf += bytes(trailer)
        yield bytes(buf)
    finally:
        os.close(fd)


class Stream:
    """Chunks of a blocking generator, each pulled in a worker thread. Always ``close()`` it."""

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None] | None = None
                 ) -> None:
        self._chunks = chunks
        self._on_close = on_close

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await asyncio.to_thread(next, self._chunks, None)
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        with contextlib.suppress(ValueError):  # still running in its thread (shutdown)
            self._chunks.close()  # type: ignore[attr-defined]
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


@dataclass
class Archive:
    name: str  # "<last path component>.tar"
    stream: Callable[[], Stream]


@dataclass
class Download:
    archives: list[Archive]
    size: int  # tar bytes, as measured when admitted
    entries: int


async def tar_archives(area: Area, paths: Sequence[str]) -> Download:
    """One tar archive per path (a file, or a directory with its contents), measured and
    admitted now, streamed later.

    Raises InvalidRequest (none, too many, too big, too many entries), NotFound, UnsafePath.
    """
    if not paths:
        raise InvalidRequest("No files to download: send {\"files\": [...]}.")
    if len(paths) > MAX_DOWNLOAD_FILES:
        raise InvalidRequest(f"Too many files: {len(paths)} (at most {MAX_DOWNLOAD_FILES}).")
    located = []
    for p in paths:  # lexical checks first
        root, parts = area.locate(p, write=False)
        located.append((p, root, parts, parts[-1] if parts else "."))
    admitted = _Count()

    def measure() -> None:
        for p, root, parts, arcname in located:
            _measure(root, parts, p, arcname, admitted)

    await asyncio.to_thread(measure)
    sent = _Count(DownloadAborted)  # shared by the archives of this request
    archives = [_archive(root, parts, p, arcname, sent) for p, root, parts, arcname in located]
    return Download(archives, admitted.bytes, admitted.entries)


def _archive(root: Path, parts: tuple[str, ...], shown: str, arcname: str,
             sent: _Count) -> Archive:
    return Archive((parts[-1] if parts else "work") + ".tar",
                   lambda: Stream(_tar_chunks(root, parts, shown, arcname, sent)))


def _file_chunks(fd: int, size: int) -> Iterator[bytes]:
    left = size
    while left:
        data = os.read(fd, min(CHUNK, left))
        if not data:
            return  # cut short meanwhile: send what there is
        left -= len(data)
        yield data


async def single_file(area: Area, path: str) -> tuple[str, int, Stream]:
    """(name, size, stream) of one regular file.

    Raises InvalidRequest (no path, a directory, too big), NotFound, UnsafePath.
    """
    root, parts = area.locate(path, write=False)
    if not parts:
        raise InvalidRequest("download_single needs the path of a file, not the top "
                             "directory.")
    fd, st = await asyncio.to_thread(open_member, root, parts, path)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InvalidRequest(f"{path!r} is a directory; use download for directories.")
    if st.st_size > MAX_DOWNLOAD_BYTES:
        os.close(fd)
        raise InvalidRequest(f"{path!r} exceeds {MAX_DOWNLOAD_BYTES} bytes.")
    return parts[-1], st.st_size, Stream(_file_chunks(fd, st.st_size), lambda: os.close(fd))
