"""Backend.AI session files: upload, list, download, download_single (backendai.md §3.5).

As the real SDK sends them: upload is multipart/form-data with parts named ``src`` whose
filenames are percent-encoded paths; list and download are GETs with a JSON body (or the same
keys in the query string). Paths are checked once, in :mod:`bridge.files`.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import quote, unquote

from pydantic import BaseModel, ConfigDict, Field
from tornado.iostream import StreamClosedError

from bridge import downloads, files
from bridge.downloads import DownloadAborted, Stream
from bridge.errors import InvalidRequest

from ..openapi import Operation
from .handlers import PREFIX, BackendAIHandler


class _Params(BaseModel):
    model_config = ConfigDict(extra="allow")


log = logging.getLogger("kernel_bridge.api")


class ListFiles(_Params):
    path: str = Field(default=".", description="a directory under /home/work (or the folder's "
                      "top)", examples=["."])
    limit: int = Field(default=files.MAX_LIST_ENTRIES, ge=1, le=files.MAX_LIST_ENTRIES,
                       description="entries per page, in name order", examples=[100])
    after: str | None = Field(default=None, description="page on: the last filename of the "
                              "previous page", examples=["main.py"])


class Download(_Params):
    files: list[str] = Field(description=f"at most {downloads.MAX_DOWNLOAD_FILES} paths; "
                             f"{downloads.MAX_DOWNLOAD_BYTES} tar bytes (headers included) and "
                             f"{downloads.MAX_DOWNLOAD_ENTRIES} entries in all",
                             examples=[["out.txt"]])


class DownloadSingle(_Params):
    file: str = Field(description="One path under /home/work.", examples=["out.txt"])


class Listing(BaseModel):
    files: str = Field(description="a JSON-encoded list of {filename, size, mode, ctime, "
                                   "mtime, atime}: one page, in name order",
                       examples=['[{"filename": "main.py", "size": 12, "mode": "-rw-r--r--", '
                                 '"ctime": 0, "mtime": 0, "atime": 0}]'])
    errors: str = Field(description="What could not be listed.", examples=[""])
    abspath: str = Field(description="The listed directory as the kernel sees it.",
                         examples=["/home/work"])
    folder_path: str = Field(description="The listed path, as asked.", examples=["."])
    total: int = Field(description="entries in the directory", examples=[1])
    truncated: bool = Field(description="more entries follow: ask again with after=<the last "
                                        "filename>", examples=[False])


class FilesHandler(BackendAIHandler):
    """Shared request and response helpers of the session and folder file routes."""

    LIST_KEYS: tuple[str, ...] = ("files",)

    def params(self) -> dict[str, Any]:
        """The JSON body's keys, else the query string's (GET with a body is what the SDK
        sends; browsers and curl use the query)."""
        body = self.json_object()
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        if body:
            return body
        out: dict[str, Any] = {}
        for key, values in self.request.query_arguments.items():
            decoded = [v.decode(errors="replace") for v in values]
            out[key] = decoded if key in self.LIST_KEYS else decoded[-1]
        return out

    def uploaded(self) -> list[tuple[str, bytes]]:
        """(percent-decoded filename, bytes) of every file part. Raises InvalidRequest."""
        ctype = self.request.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            raise InvalidRequest("Upload needs a multipart/form-data body with parts named "
                                 "'src'.")
        out = []
        for parts in self.request.files.values():
            for part in parts:
                name = unquote(part.filename or "")
                if not name.strip():
                    raise InvalidRequest("An uploaded part has no filename.")
                out.append((name, part.body))
        return out

    async def list_dir(self, area: files.Area) -> None:
        q = self.parse(ListFiles, self.params())
        page = await files.listing(area, q.path, limit=q.limit, after=q.after)
        # The docs call the path key folder_path, the manager's code abspath: send both. The
        # SDK reads only "files"; total and truncated tell a client that the page is not all.
        self.send({"files": files.files_json(page.items), "errors": "", "abspath": q.path,
                   "folder_path": q.path, "total": page.total, "truncated": page.truncated})

    async def send_archives(self, area: files.Area) -> None:
        """multipart/mixed, one tar archive per requested path, as the SDK reads it, streamed.

        The download was measured and admitted (400 past its budget) before the first byte.
        """
        q = self.parse(Download, self.params())
        download = await downloads.tar_archives(area, q.files)
        boundary = secrets.token_hex(16)
        self.set_header("Content-Type", f"multipart/mixed; boundary={boundary}")
        for archive in download.archives:
            head = (f"--{boundary}\r\nContent-Type: application/x-tar\r\n"
                    f"Content-Disposition: attachment; filename*=utf-8''{_quoted(archive.name)}"
                    "\r\nContent-Encoding: identity\r\nContent-Transfer-Encoding: binary"
                    "\r\n\r\n")
            self.write(head.encode())
            if not await self.relay(archive.stream()):
                return
            self.write(b"\r\n")
        self.finish(f"--{boundary}--\r\n".encode())

    async def send_file(self, area: files.Area) -> None:
        q = self.parse(DownloadSingle, self.params())
        name, size, stream = await downloads.single_file(area, q.file)
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", f"attachment; filename*=utf-8''{_quoted(name)}")
        self.set_header("Content-Length", str(size))
        if await self.relay(stream):
            self.finish()

    async def relay(self, stream: Stream) -> bool:
        """Write a stream out, chunk by chunk as the client takes them. False: the response
        was cut (client gone, or the tree grew past the budget while it was sent)."""
        try:
            async for chunk in stream:
                self.write(chunk)
                await self.flush()
        except (StreamClosedError, DownloadAborted) as exc:
            log.info("%s %s cut short: %s", self.request.method, self.request.path, exc)
            # Headers are gone: only a broken connection tells the client it is incomplete.
            self.request.connection.close()  # type: ignore[union-attr]
            self._finished = True
            return False
        finally:
            stream.close()
        return True

    def session_area(self, ident: str) -> files.Area:
        s = self.session(ident)
        return files.Area(root=s.workdir, label="/home/work", mounts=s.mounts)


class SessionUploadHandler(FilesHandler):
    owner_of = "session"

    async def post(self, ident: str) -> None:
        """Write the uploaded files under /home/work: 204. 400/403/404."""
        area = self.session_area(ident)
        await files.upload(area, self.uploaded())
        self.send(None, 204)


class SessionFilesHandler(FilesHandler):
    owner_of = "session"

    async def get(self, ident: str) -> None:
        """List a directory: {"files": "<json>", "errors", "abspath"}. 400/404."""
        await self.list_dir(self.session_area(ident))


class SessionDownloadHandler(FilesHandler):
    owner_of = "session"

    async def get(self, ident: str) -> None:
        """multipart/mixed of tar archives, one per path (at most 5). 400/404."""
        await self.send_archives(self.session_area(ident))


class SessionDownloadSingleHandler(FilesHandler):
    owner_of = "session"

    async def get(self, ident: str) -> None:
        """One file's bytes (as manager 23.09 does). 400/404."""
        await self.send_file(self.session_area(ident))


def _quoted(name: str) -> str:
    return quote(name, errors="surrogateescape")  # a file name need not be UTF-8


def routes() -> list[tuple[str, type[BackendAIHandler]]]:
    # Registered before handlers.routes(): its PREFIX/([^/]+) would otherwise match first.
    return [
        (PREFIX + r"/([^/]+)/upload", SessionUploadHandler),
        (PREFIX + r"/([^/]+)/files", SessionFilesHandler),
        (PREFIX + r"/([^/]+)/download", SessionDownloadHandler),
        (PREFIX + r"/([^/]+)/download_single", SessionDownloadSingleHandler),
    ]



_S = "/session/{id}"
OPERATIONS = [
    Operation("POST", _S + "/upload", "Upload files (multipart/form-data, parts named src, "
              "percent-encoded filenames; at most 20, each at most 1 MiB)", "backendai-files",
              status=204, errors=(400, 401, 403, 404)),
    Operation("GET", _S + "/files", "List a directory under /home/work (JSON body or query)",
              "backendai-files", ListFiles, Listing, errors=(400, 401, 404),
              query=("path", "limit", "after")),
    Operation("GET", _S + "/download", "Download at most 5 paths: multipart/mixed, one tar "
              "archive each", "backendai-files", Download, errors=(400, 401, 404),
              query=("files",)),
    Operation("GET", _S + "/download_single", "One file's bytes", "backendai-files",
              DownloadSingle, errors=(400, 401, 404), query=("file",)),
]
