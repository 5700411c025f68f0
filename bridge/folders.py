"""Virtual folders: directories in the data dir that outlive sessions, owned by a keypair,
shared with others by invitation, and mounted into sessions at ``/home/work/<alias>``.

Every row is written before the call that made it returns. A folder's files live at
``folders_dir/<folder id>``; its name is only a label, unique per keypair among the folders it
can see (its own and the accepted ones), so a name in a request means exactly one folder.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .disk import Volumes
from .errors import Conflict, Forbidden, InvalidRequest, NotFound
from .files import Area
from .sandbox import Mount
from .store import Store, upsert

NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")  # as the manager's slug
RESERVED = frozenset({"invitations", "_"})
PERMISSIONS = ("ro", "rw")
MAX_MOUNTS = 5
# Each folder is a filesystem image and a loop device: a keypair may not make them without end.
MAX_FOLDERS = 32
MAX_PENDING_INVITATIONS = 64  # per invitee: another tenant may not flood its invitation list
INVITATION_COUNT_LIMIT = 10_000  # numFiles of an invitation counts no further


@dataclass(frozen=True)
class Folder:
    id: str
    name: str
    owner: str
    created: str
    permission: str  # the viewer's: "rw" for the owner
    host: Path

    def is_owner(self, access_key: str) -> bool:
        return self.owner == access_key

    def area(self, *, write: bool) -> Area:
        if write and self.permission != "rw":
            raise Forbidden(f"Folder {self.name!r} is shared read-only with this keypair.")
        return Area(root=self.host, label=f"folder {self.name!r}",
                    writable=self.permission == "rw", session=False)


def count_files(host: Path, limit: int | None = None) -> int:
    """Regular files under ``host`` (at most ``limit``); links are neither followed nor
    counted."""
    total, stack = 0, [str(host)]
    while stack and (limit is None or total < limit):
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += 1
        except OSError:
            continue  # vanished meanwhile
    return total


class Folders:
    """The folder registry. ``in_use(host)`` names a live session that mounts ``host``;
    ``own(host)`` hands a new folder's directory to the sandbox uid (what user code runs as)."""

    def __init__(self, store: Store, root: Path, now: Callable[[], str],
                 keypair_exists: Callable[[str], Awaitable[bool]],
                 volumes: Volumes | None = None) -> None:
        self.store = store
        self.volumes = volumes
        self.root = root
        self._now = now
        self._keypair_exists = keypair_exists
        self.in_use: Callable[[Path], str | None] = lambda host: None
        self.own: Callable[[Path], None] = lambda host: None

    def _folder(self, row: dict[str, Any], permission: str) -> Folder:
        return Folder(row["id"], row["name"], row["owner"], row["created"], permission,
                      self.root / row["id"])

    async def visible(self, access_key: str) -> list[Folder]:
        """Folders this keypair owns or has accepted, oldest first."""
        rows = await self.store.fetchall(
            "SELECT f.*, 'rw' AS perm FROM vfolders f WHERE f.owner = ?"
            " UNION ALL SELECT f.*, p.permission AS perm FROM vfolders f"
            " JOIN vfolder_permissions p ON p.folder_id = f.id WHERE p.access_key = ?"
            " ORDER BY created, name", (access_key, access_key))
        return [self._folder(r, r["perm"]) for r in rows]

    async def get(self, access_key: str, name: str) -> Folder:
        """A folder this keypair can see, by name or id. Raises NotFound."""
        for f in await self.visible(access_key):
            if name in (f.name, f.id):
                return f
        raise NotFound(f"No virtual folder {name!r} for this keypair.")

    async def create(self, access_key: str, name: str) -> Folder:
        """Raises InvalidRequest (bad name), Conflict (name taken)."""
        if not NAME.match(name) or name in RESERVED:
            raise InvalidRequest(f"Invalid folder name {name!r}: 1-64 letters, digits, '.', "
                                 "'_' or '-', starting and ending with a letter or digit.")
        visible = await self.visible(access_key)
        if any(f.name == name for f in visible):
            raise Conflict(f"A virtual folder named {name!r} already exists.")
        if sum(1 for f in visible if f.is_owner(access_key)) >= MAX_FOLDERS:
            raise InvalidRequest(f"A keypair may own at most {MAX_FOLDERS} virtual folders.")
        fid = uuid.uuid4().hex
        host = self.root / fid
        if self.volumes is not None:  # a filesystem of its own: the folder's disk quota
            await self.volumes.make_folder_dir(host)
            await asyncio.to_thread(os.chmod, host, 0o755)
        else:
            await asyncio.to_thread(host.mkdir, 0o755, True)
        await asyncio.to_thread(self.own, host)  # uploads then inherit it (bridge/files.py)
        created = self._now()
        await self.store.execute(
            "INSERT INTO vfolders (id, name, owner, created) VALUES (?, ?, ?, ?)",
            (fid, name, access_key, created))
        return Folder(fid, name, access_key, created, "rw", host)

    async def delete(self, access_key: str, name: str) -> None:
        """Raises NotFound, Forbidden (not the owner), Conflict (mounted in a live session)."""
        folder = await self.get(access_key, name)
        if not folder.is_owner(access_key):
            raise Forbidden(f"Only the owner may delete folder {folder.name!r}.")
        session = self.in_use(folder.host)
        if session is not None:
            raise Conflict(f"Folder {folder.name!r} is mounted in session {session!r}.")
        await self.store.transaction([
            ("DELETE FROM vfolder_invitations WHERE folder_id = ?", (folder.id,)),
            ("DELETE FROM vfolder_permissions WHERE folder_id = ?", (folder.id,)),
            ("DELETE FROM vfolders WHERE id = ?", (folder.id,)),
        ])
        await self._remove_dir(folder.host)

    async def _remove_dir(self, host: Path) -> None:
        if self.volumes is not None:
            await self.volumes.remove(host)
        else:
            await asyncio.to_thread(shutil.rmtree, host, True)

    async def num_files(self, folder: Folder) -> int:
        return await asyncio.to_thread(count_files, folder.host)

    # -- sharing ----------------------------------------------------------------------------

    async def invite(self, access_key: str, name: str, permission: str,
                     invitees: list[str]) -> list[str]:
        """Invite keypairs (by access key); returns the invitation ids.

        Raises NotFound (folder, keypair), Forbidden (not the owner), InvalidRequest.
        """
        if permission not in PERMISSIONS:
            raise InvalidRequest(f"Invalid permission {permission!r}: one of ro, rw.")
        if not invitees:
            raise InvalidRequest("No one to invite: send user_ids (access keys).")
        folder = await self.get(access_key, name)
        if not folder.is_owner(access_key):
            raise Forbidden(f"Only the owner may invite to folder {folder.name!r}.")
        for key in invitees:
            if key == access_key:
                raise InvalidRequest("A keypair cannot invite itself.")
            if not await self._keypair_exists(key):
                raise NotFound(f"No keypair with access key {key!r}.")
            row = await self.store.fetchone(
                "SELECT COUNT(*) AS n FROM vfolder_invitations WHERE invitee = ?"
                " AND state = 'pending'", (key,))
            if row is not None and row["n"] >= MAX_PENDING_INVITATIONS:
                raise Conflict(f"Keypair {key!r} has {MAX_PENDING_INVITATIONS} pending "
                               "invitations already.")
        ids, statements = [], []
        for key in dict.fromkeys(invitees):
            iid = uuid.uuid4().hex
            ids.append(iid)
            statements.append((
                ("INSERT INTO vfolder_invitations (id, folder_id, inviter, invitee, permission,"
                 " state, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)"),
                (iid, folder.id, access_key, key, permission, self._now())))
        await self.store.transaction(statements)
        return ids

    async def invitations(self, access_key: str) -> list[dict[str, Any]]:
        """Pending invitations to this keypair (seed 002 invitation objects)."""
        rows = await self.store.fetchall(
            "SELECT i.*, f.name AS folder_name FROM vfolder_invitations i JOIN vfolders f"
            " ON f.id = i.folder_id WHERE i.invitee = ? AND i.state = 'pending'"
            " ORDER BY i.created_at", (access_key,))
        out = []
        for r in rows:
            out.append({
                "id": r["id"], "inviter": r["inviter"], "invitee": r["invitee"],
                "permission": r["permission"], "perm": r["permission"], "state": r["state"],
                # Bounded: another tenant's folders must not make this list slow to build.
                "numFiles": await asyncio.to_thread(count_files, self.root / r["folder_id"],
                                                    INVITATION_COUNT_LIMIT),
                "vfolder_id": r["folder_id"], "vfolder_name": r["folder_name"],
                "created_at": r["created_at"]})
        return out

    async def _pending(self, access_key: str, invitation_id: str) -> dict[str, Any]:
        row = await self.store.fetchone(
            "SELECT i.*, f.name AS folder_name FROM vfolder_invitations i JOIN vfolders f"
            " ON f.id = i.folder_id WHERE i.id = ? AND i.invitee = ? AND i.state = 'pending'",
            (invitation_id, access_key))
        if row is None:
            raise NotFound(f"No pending invitation {invitation_id!r} for this keypair.")
        return row

    async def accept(self, access_key: str, invitation_id: str) -> None:
        """Raises NotFound, Conflict (a folder of that name is already visible)."""
        inv = await self._pending(access_key, invitation_id)
        if any(f.name == inv["folder_name"] for f in await self.visible(access_key)):
            raise Conflict(f"A virtual folder named {inv['folder_name']!r} is already visible "
                           "to this keypair.")
        await self.store.transaction([
            (upsert("vfolder_permissions", ("folder_id", "access_key", "permission"),
                    ("folder_id", "access_key")),
             (inv["folder_id"], access_key, inv["permission"])),
            ("UPDATE vfolder_invitations SET state = 'accepted' WHERE id = ?", (inv["id"],)),
        ])

    async def reject(self, access_key: str, invitation_id: str) -> None:
        """Raises NotFound."""
        inv = await self._pending(access_key, invitation_id)
        await self.store.execute(
            "UPDATE vfolder_invitations SET state = 'rejected' WHERE id = ?", (inv["id"],))

    # -- mounting ---------------------------------------------------------------------------

    async def mounts(self, access_key: str, specs: list[str]) -> tuple[Mount, ...]:
        """``name`` or ``name:alias`` → a Mount at /home/work/<alias>; ro folders read-only.

        Raises InvalidRequest (too many, bad alias, duplicate), NotFound.
        """
        if len(specs) > MAX_MOUNTS:
            raise InvalidRequest(f"At most {MAX_MOUNTS} folders may be mounted per session.")
        mounts: list[Mount] = []
        for spec in specs:
            name, _, alias = spec.partition(":")
            alias = alias.strip().removeprefix("/home/work/").strip("/") or name
            if not NAME.match(alias):
                raise InvalidRequest(f"Invalid mount alias {alias!r}: one path component of "
                                     "letters, digits, '.', '_' or '-'.")
            if any(m.target == alias for m in mounts):
                raise InvalidRequest(f"Two folders are mounted at {alias!r}.")
            folder = await self.get(access_key, name)
            mounts.append(Mount(host=folder.host, target=alias,
                                read_only=folder.permission != "rw"))
        return tuple(mounts)
