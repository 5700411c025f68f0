"""Files of a session's working dir or of a virtual folder: the one place that decides what a
client path may touch.

A client names a file by a path relative to ``/home/work`` (or absolute under it); a folder's
paths are relative to its top. :func:`parts_of` is the lexical check: ``..``, NUL bytes,
absolute paths elsewhere are refused before anything is opened. The disk is then walked one
component at a time with ``O_NOFOLLOW`` relative to the previous directory's descriptor, so a
symbolic link is never followed (user code may plant one pointing anywhere on the host) and a
link swapped in while we walk is refused too. Everything blocking runs in a worker thread.

What the server writes (directories and files of an upload) takes the owner of the directory it
is written into: the sandbox uid in a session's working dir or a folder (which the sandbox owns),
so user code can change or remove uploads; root's where the sandbox is off.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import json
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import Forbidden, InvalidRequest, NotFound, UnsafePath
from .sandbox import WORKDIR, Mount

MAX_UPLOAD_FILES = 20  # Backend.AI's limits (seed 000)
MAX_UPLOAD_BYTES = 1024 * 1024
# A listing answers at most this many entries, in name order; ``after`` pages on (a directory
# of 150k files would otherwise be a 54 MB reply built in the server's memory).
MAX_LIST_ENTRIES = 1000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Area:
    """A tree clients reach through the files API: a session's working dir or a folder."""

    root: Path  # host directory
    label: str  # what clients call its top, for messages
    writable: bool = True
    mounts: tuple[Mount, ...] = ()  # folders mounted under it (sessions only)
    session: bool = True  # paths may be absolute under /home/work

    def locate(self, path: str, *, write: bool) -> tuple[Path, tuple[str, ...]]:
        """(host root, components) for a client path. Raises UnsafePath, Forbidden."""
        parts = parts_of(path, absolute_base=WORKDIR if self.session else None)
        for m in self.mounts:
            target = tuple(PurePosixPath(m.target).parts)
            if parts[:len(target)] == target:
                if write:
                    # Seed 000: uploads never go into a mounted folder through a session.
                    raise Forbidden(f"{path!r} is inside the mounted folder {m.target!r}; "
                                    "upload to the folder through the folders API.")
                return m.host, parts[len(target):]
        if write and not self.writable:
            raise Forbidden(f"{self.label} is read-only for this keypair.")
        return self.root, parts


def parts_of(path: str, *, absolute_base: str | None = WORKDIR) -> tuple[str, ...]:
    """The components of a client path, refusing anything that could leave its base.

    Raises UnsafePath.
    """
    if "\x00" in path:
        raise UnsafePath(path, "it contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise UnsafePath(path, "it is not valid UTF-8 (a lone surrogate)") from None
    p = PurePosixPath(path)
    if p.is_absolute():
        base = PurePosixPath(absolute_base) if absolute_base else None
        if base is None or not (p == base or base in p.parents):
            where = absolute_base or "the folder"
            raise UnsafePath(path, f"absolute paths must be under {where}")
        p = p.relative_to(base)
    parts = tuple(x for x in p.parts if x not in ("", "."))
    if ".." in parts:
        raise UnsafePath(path, "'..' is not allowed")
    return parts


# -- descriptor walking (worker thread only) ---------------------------------------------------

def _refusal(dir_fd: int, name: str, shown: str) -> Exception:
    """Why ``name`` could not be opened as a directory."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return NotFound(f"No such file or directory: {shown!r}.")
    if stat.S_ISLNK(st.st_mode):
        return UnsafePath(shown, "it is a symbolic link, and links are never followed")
    return InvalidRequest(f"{shown!r} is not a directory.")


@contextmanager
def _open_dir(root: Path, parts: Sequence[str], *, create: bool = False) -> Iterator[int]:
    """A descriptor for ``root/parts``, never following a link. Raises NotFound, UnsafePath."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            shown = "/".join(parts[:i + 1])
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"No such file or directory: {shown!r}.") from None
                os.mkdir(name, 0o755, dir_fd=fd)
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                _inherit_owner(nfd, fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refusal(fd, name, shown) from None
                raise
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def _check_writable(root: Path, parts: tuple[str, ...], shown: str) -> None:
    """Refuse, before anything is written, a target that is or passes a link or a non-dir."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                return  # the rest will be created
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(shown, "it passes a symbolic link, and links are never followed")
            last = i == len(parts) - 1
            if last and stat.S_ISDIR(st.st_mode):
                raise InvalidRequest(f"{shown!r} is a directory.")
            if last:
                return
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidRequest(f"{'/'.join(parts[:i + 1])!r} is not a directory.")
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def _write_all(targets: list[tuple[Path, tuple[str, ...], str, bytes]]) -> None:
    for root, parts, shown, _ in targets:  # all-or-nothing: check every target first
        _check_writable(root, parts, shown)
    for root, parts, shown, data in targets:
        with _open_dir(root, parts[:-1], create=True) as dfd:
            try:
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafePath(shown, "it is a symbolic link") from None
                raise
            _inherit_owner(fd, dfd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)


def _inherit_owner(fd: int, parent_fd: int) -> None:
    """Give what ``fd`` names the owner of its parent directory (both held open: no path, no
    link to follow)."""
    parent = os.fstat(parent_fd)
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (parent.st_uid, parent.st_gid):
        os.fchown(fd, parent.st_uid, parent.st_gid)


def _entry(name: str, st: os.stat_result) -> dict[str, Any]:
    return {"filename": name, "size": st.st_size, "mode": stat.filemode(st.st_mode),
            "ctime": st.st_ctime, "mtime": st.st_mtime, "atime": st.st_atime}


@dataclass
class Listing:
    items: list[dict[str, Any]]  # one page, by name
    total: int  # entries in the directory
    truncated: bool  # more entries after this page


def _list(root: Path, parts: tuple[str, ...], limit: int, after: str | None) -> Listing:
    with _open_dir(root, parts) as fd:
        total = 0

        def names() -> Iterator[str]:
            nonlocal total
            with os.scandir(fd) as it:
                for e in it:
                    total += 1
                    if after is None or e.name > after:
                        yield e.name

        # The page's names only: memory follows the limit, not the directory.
        page = heapq.nsmallest(limit + 1, names())
        items = []
        for name in page[:limit]:
            try:
                items.append(_entry(name, os.lstat(name, dir_fd=fd)))
            except FileNotFoundError:
                continue  # removed meanwhile
    return Listing(items, total, len(page) > limit)


def open_member(root: Path, parts: tuple[str, ...], shown: str) -> tuple[int, os.stat_result]:
    """An O_NOFOLLOW descriptor of a regular file or directory and its stat (worker thread).

    Raises NotFound, UnsafePath, InvalidRequest (neither a file nor a directory).
    """
    if not parts:
        with _open_dir(root, ()) as fd:
            return os.dup(fd), os.fstat(fd)
    with _open_dir(root, parts[:-1]) as dfd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(f"No such file or directory: {shown!r}.") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(shown, "it is a symbolic link, and links are never followed"
                                 ) from None
            raise
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        os.close(fd)
        raise InvalidRequest(f"{shown!r} is neither a file nor a directory.")
    return fd, st


# -- the async API ------------------------------------------------------------------------------

async def upload(area: Area, files: Sequence[tuple[str, bytes]]) -> list[str]:
    """Write ``(path, data)`` pairs, creating directories; all or nothing.

    Raises InvalidRequest (too many, too large, empty name), UnsafePath, Forbidden.
    """
    if not files:
        raise InvalidRequest("No files in the upload (send multipart parts named 'src').")
    if len(files) > MAX_UPLOAD_FILES:
        raise InvalidRequest(f"Too many files: {len(files)} (at most {MAX_UPLOAD_FILES}).")
    targets = []
    for path, data in files:
        if len(data) > MAX_UPLOAD_BYTES:
            raise InvalidRequest(f"Too large file: {path!r} has {len(data)} bytes "
                                 f"(at most {MAX_UPLOAD_BYTES}).")
        root, parts = area.locate(path, write=True)
        if not parts:
            raise UnsafePath(path, "it names the top directory, not a file")
        targets.append((root, parts, path, data))
    await asyncio.to_thread(_write_all, targets)
    return ["/".join(t[1]) for t in targets]


async def listing(area: Area, path: str, *, limit: int = MAX_LIST_ENTRIES,
                  after: str | None = None) -> Listing:
    """``{filename, size, mode, ctime, mtime, atime}`` of the first ``limit`` entries of a
    directory by name (those after ``after``), with the directory's size.

    Raises NotFound, UnsafePath, InvalidRequest (not a directory).
    """
    root, parts = area.locate(path, write=False)
    limit = max(1, min(limit, MAX_LIST_ENTRIES))
    result: Listing = await asyncio.to_thread(_list, root, parts, limit, after)
    return result


def files_json(items: list[dict[str, Any]]) -> str:
    """Backend.AI sends the listing as a JSON string inside the JSON body."""
    return json.dumps(items)
