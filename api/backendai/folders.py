"""Backend.AI virtual folders, shaped after the 19.09 manager's ``/folders`` API (seed 002).

    POST   /folders                          {name}            → 201 folder
    GET    /folders                          [size, index]     → list; with size: paging object
    DELETE /folders                          {id}              → 204
    GET    /folders/{name}                                     → folder item (numFiles, …)
    DELETE /folders/{name}                                     → 204
    POST   /folders/{name}/upload            multipart "src"   → 201
    GET    /folders/{name}/files             {path}            → {"files": "<json>", …}
    GET    /folders/{name}/download          {files}           → multipart/mixed of tars
    GET    /folders/{name}/download_single   {file}            → the file's bytes
    POST   /folders/{name}/invite            {perm, user_ids}  → 201 {"invited_ids"}
    GET    /folders/invitations/list                           → {"invitations": [...]}
    POST   /folders/invitations/accept       {inv_id}          → 200 {}
    POST   /folders/invitations/reject       {inv_id}          → 200 {}
    DELETE /folders/invitations/delete       {inv_id}          → 200 {} (the SDK's reject)

``user_ids`` are access keys: a keypair is this server's user.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from bridge import files
from bridge.folders import Folder

from ..openapi import Operation
from .files import Download, DownloadSingle, FilesHandler, ListFiles, Listing

FOLDER = r"/folders/([^/]+)"


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # the SDK sends host, usage_mode, quota, …


class CreateFolder(_Body):
    # What backend.ai-client sends that a local folder store has no use for.
    ignored_fields: ClassVar[frozenset[str]] = frozenset({
        "host", "usage_mode", "permission", "quota", "group", "unmanaged_path", "cloneable",
        "type"})

    name: str = Field(min_length=1, max_length=64, description="The folder's name.",
                      examples=["data"])


class DeleteById(_Body):
    id: str = Field(description="The folder's id.", examples=["f1e2d3c4b5a6"])


class Paging(_Body):
    size: int = Field(default=0, ge=0, description="items per page; 0 or absent: all",
                      examples=[20])
    index: int = Field(default=0, ge=0, description="zero-based page", examples=[0])


class Invite(_Body):
    perm: Literal["ro", "rw"] = Field(default="rw", description="ro: read-only; rw: "
                                      "read-write.", examples=["ro"])
    user_ids: list[str] = Field(min_length=1, description="access keys to invite",
                                examples=[["AKIA0123456789ABCDEF"]])


class InvitationRef(_Body):
    inv_id: str = Field(description="The invitation's id.", examples=["a1b2c3d4"])


class FolderHandler(FilesHandler):
    LIST_KEYS = ("files",)

    async def folder(self, name: str) -> Folder:
        return await self.bridge.folders.get(self.keypair.access_key, name)

    def item(self, f: Folder) -> dict[str, Any]:
        return {"name": f.name, "id": f.id, "is_owner": f.is_owner(self.keypair.access_key),
                "permission": f.permission, "created_at": f.created, "host": "local",
                "usage_mode": "general", "type": "user"}


class FoldersHandler(FolderHandler):
    async def post(self) -> None:
        """Create a folder: 201. 400 bad name, 409 name taken."""
        body = self.parse(CreateFolder)
        f = await self.bridge.folders.create(self.keypair.access_key, body.name)
        self.send({**self.item(f), "numFiles": 0}, 201)

    async def get(self) -> None:
        """The folders this keypair owns or accepted. 200."""
        q = self.parse(Paging, self.params())
        items = [self.item(f) for f in await self.bridge.folders.visible(self.keypair.access_key)]
        if not q.size:
            self.send(items)
            return
        page = items[q.index * q.size:(q.index + 1) * q.size]
        self.send({"items": page, "paging": {"pages": math.ceil(len(items) / q.size),
                                             "count": len(items)}})

    async def delete(self) -> None:
        """Delete by id (the SDK's delete_by_id): 204. 403/404/409."""
        body = self.parse(DeleteById)
        await self.bridge.folders.delete(self.keypair.access_key, body.id)
        self.send(None, 204)


class FolderInfoHandler(FolderHandler):
    async def get(self, name: str) -> None:
        """Virtual Folder Item Object: numFiles, created, permission, is_owner. 404."""
        f = await self.folder(name)
        self.send({**self.item(f), "linked": False, "created": f.created,
                   "numFiles": await self.bridge.folders.num_files(f)})

    async def delete(self, name: str) -> None:
        """204. 403 not the owner, 404, 409 mounted in a live session."""
        await self.bridge.folders.delete(self.keypair.access_key, name)
        self.send(None, 204)


class FolderUploadHandler(FolderHandler):
    async def post(self, name: str) -> None:
        """201. 400 too many/too large/bad path, 403 read-only, 404."""
        f = await self.folder(name)
        await files.upload(f.area(write=True), self.uploaded())
        self.send(None, 201)


class FolderFilesHandler(FolderHandler):
    async def get(self, name: str) -> None:
        """{"files": "<json>", "folder_path", "errors"}. 400/404."""
        f = await self.folder(name)
        await self.list_dir(f.area(write=False))


class FolderDownloadHandler(FolderHandler):
    async def get(self, name: str) -> None:
        """multipart/mixed of tar archives (at most 5). 400/404."""
        f = await self.folder(name)
        await self.send_archives(f.area(write=False))


class FolderDownloadSingleHandler(FolderHandler):
    async def get(self, name: str) -> None:
        """One file's bytes. 400/404."""
        f = await self.folder(name)
        await self.send_file(f.area(write=False))


class InviteHandler(FolderHandler):
    async def post(self, name: str) -> None:
        """Invite keypairs: 201 {"invited_ids"}. 400, 403 not the owner, 404."""
        body = self.parse(Invite)
        ids = await self.bridge.folders.invite(self.keypair.access_key, name, body.perm,
                                               body.user_ids)
        self.send({"invited_ids": ids}, 201)


class InvitationsHandler(FolderHandler):
    async def get(self) -> None:
        """Pending invitations to this keypair (seed 002 objects)."""
        self.send({"invitations": await self.bridge.folders.invitations(
            self.keypair.access_key)})


class AcceptHandler(FolderHandler):
    async def post(self) -> None:
        """Accept: the folder becomes visible and mountable. 404, 409 name clash."""
        body = self.parse(InvitationRef)
        await self.bridge.folders.accept(self.keypair.access_key, body.inv_id)
        self.send({})


class RejectHandler(FolderHandler):
    async def post(self) -> None:
        """Reject: 200. 404."""
        body = self.parse(InvitationRef)
        await self.bridge.folders.reject(self.keypair.access_key, body.inv_id)
        self.send({})

    async def delete(self) -> None:
        await self.post()


def routes() -> list[tuple[str, type[FolderHandler]]]:
    return [
        (r"/folders/?", FoldersHandler),
        (r"/folders/invitations/list", InvitationsHandler),
        (r"/folders/invitations/accept", AcceptHandler),
        (r"/folders/invitations/(?:reject|delete)", RejectHandler),
        (FOLDER + r"/upload", FolderUploadHandler),
        (FOLDER + r"/files", FolderFilesHandler),
        (FOLDER + r"/download", FolderDownloadHandler),
        (FOLDER + r"/download_single", FolderDownloadSingleHandler),
        (FOLDER + r"/invite", InviteHandler),
        (FOLDER + r"/?", FolderInfoHandler),
    ]


_T = "backendai-folders"
_F = "/folders/{name}"
OPERATIONS = [
    Operation("POST", "/folders", "Create a virtual folder", _T, CreateFolder, status=201,
              errors=(400, 401, 409)),
    Operation("GET", "/folders", "Folders this keypair owns or accepted (a list; with size: "
              "{items, paging})", _T, errors=(400, 401), query=("size", "index")),
    Operation("DELETE", "/folders", "Delete a folder by id", _T, DeleteById, status=204,
              errors=(401, 403, 404, 409)),
    Operation("GET", _F, "Folder information (numFiles, permission, is_owner)", _T,
              errors=(401, 404)),
    Operation("DELETE", _F, "Delete a folder (owner only; not while mounted)", _T, status=204,
              errors=(401, 403, 404, 409)),
    Operation("POST", _F + "/upload", "Upload files (multipart, parts named src)", _T,
              status=201, errors=(400, 401, 403, 404)),
    Operation("GET", _F + "/files", "List a directory of the folder", _T, ListFiles, Listing,
              errors=(400, 401, 404), query=("path", "limit", "after")),
    Operation("GET", _F + "/download", "Download at most 5 paths as tar archives", _T,
              Download, errors=(400, 401, 404), query=("files",)),
    Operation("GET", _F + "/download_single", "One file's bytes", _T, DownloadSingle,
              errors=(400, 401, 404), query=("file",)),
    Operation("POST", _F + "/invite", "Invite keypairs (access keys) with ro or rw", _T,
              Invite, status=201, errors=(400, 401, 403, 404)),
    Operation("GET", "/folders/invitations/list", "Pending invitations to this keypair", _T,
              errors=(401,)),
    Operation("POST", "/folders/invitations/accept", "Accept an invitation", _T,
              InvitationRef, errors=(401, 404, 409)),
    Operation("POST", "/folders/invitations/reject", "Reject an invitation (also DELETE "
              "/folders/invitations/delete)", _T, InvitationRef, errors=(401, 404)),
]
