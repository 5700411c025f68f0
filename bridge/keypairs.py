"""Keypairs own sessions, runs and folders. Looked up on every request, so they are cached
in memory; the store is the source of truth and is written before a caller is answered."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from .errors import AuthFailed
from .store import Store

# Access keys are "AKIA" and 16 upper-case hex digits (create() below); secrets never look so.
ACCESS_KEY = re.compile(r"AKIA[0-9A-F]{16}")


@dataclass(frozen=True)
class Keypair:
    access_key: str
    secret_key: str
    is_active: bool
    concurrency: int
    total_queries: int
    created: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Keypairs:
    def __init__(self, store: Store, default_concurrency: int) -> None:
        self._store = store
        self._default_concurrency = default_concurrency
        self._by_access: dict[str, Keypair] = {}
        self._by_hash: dict[str, str] = {}

    async def load(self) -> None:
        for row in await self._store.fetchall("SELECT * FROM keypairs"):
            self._remember(self._from_row(row))

    async def watch(self, interval: float) -> None:
        """Re-read the store every ``interval`` seconds, so a keypair an operator deactivates
        with ``kernel-bridge keys deactivate`` stops authenticating while the server runs."""
        while True:
            await asyncio.sleep(interval)
            await self.load()

    async def _look_up(self, column: str, value: str) -> bool:
        """Read one keypair the cache does not know (made by ``kernel-bridge keys create``
        while we run): one indexed read, no cheaper for a caller with a bad key to cause than
        the request itself."""
        row = await self._store.fetchone(f"SELECT * FROM keypairs WHERE {column}=?", (value,))
        if row is not None:
            self._remember(self._from_row(row))
        return row is not None

    async def authenticate_secret(self, secret: str) -> Keypair:
        """Like :meth:`by_secret`, looking in the store on a cache miss. Raises AuthFailed."""
        if _hash(secret) not in self._by_hash:
            await self._look_up("secret_hash", _hash(secret))
        return self.by_secret(secret)

    async def authenticate_access(self, access_key: str) -> Keypair:
        """Like :meth:`get`, looking in the store on a cache miss. Raises AuthFailed."""
        if access_key not in self._by_access:
            await self._look_up("access_key", access_key)
        return self.get(access_key)

    def _remember(self, kp: Keypair) -> None:
        self._by_access[kp.access_key] = kp
        self._by_hash[_hash(kp.secret_key)] = kp.access_key

    @staticmethod
    def _from_row(row: dict[str, object]) -> Keypair:
        return Keypair(
            access_key=str(row["access_key"]),
            secret_key=str(row["secret_key"]),
            is_active=bool(row["is_active"]),
            concurrency=int(row["concurrency"]),  # type: ignore[call-overload]
            total_queries=int(row["total_queries"]),  # type: ignore[call-overload]
            created=str(row["created"]),
        )

    async def create(self, concurrency: int | None = None) -> Keypair:
        kp = Keypair(
            access_key="AKIA" + secrets.token_hex(8).upper(),
            secret_key=secrets.token_urlsafe(30),
            is_active=True,
            concurrency=concurrency or self._default_concurrency,
            total_queries=0,
            created=datetime.now(UTC).isoformat(),
        )
        await self._store.execute(
            "INSERT INTO keypairs (access_key, secret_key, secret_hash, is_active, concurrency,"
            " total_queries, created) VALUES (?, ?, ?, 1, ?, 0, ?)",
            (kp.access_key, kp.secret_key, _hash(kp.secret_key), kp.concurrency, kp.created),
        )
        self._remember(kp)
        return kp

    async def set_active(self, access_key: str, active: bool) -> None:
        kp = self.get(access_key)
        await self._store.execute(
            "UPDATE keypairs SET is_active=? WHERE access_key=?", (int(active), access_key)
        )
        self._remember(replace(kp, is_active=active))

    async def set_concurrency(self, access_key: str, concurrency: int) -> None:
        """How many sessions the keypair may hold at once. Raises AuthFailed (unknown key)."""
        kp = self.get(access_key)
        await self._store.execute(
            "UPDATE keypairs SET concurrency=? WHERE access_key=?", (concurrency, access_key))
        self._remember(replace(kp, concurrency=concurrency))

    def all(self) -> list[Keypair]:
        return sorted(self._by_access.values(), key=lambda k: k.created)

    def get(self, access_key: str) -> Keypair:
        kp = self._by_access.get(access_key)
        if kp is None:
            raise AuthFailed("Access key not found.")
        return kp

    def by_secret(self, secret: str) -> Keypair:
        """The active keypair whose secret is ``secret``. Raises AuthFailed."""
        access = self._by_hash.get(_hash(secret))
        if access is None:
            if ACCESS_KEY.fullmatch(secret):  # a shape, not a lookup: nothing to enumerate
                raise AuthFailed("Invalid API key: this looks like an access key; send the "
                                 "secret key (the access key only names the keypair in "
                                 "Backend.AI request signatures).")
            raise AuthFailed("Invalid API key.")
        kp = self._by_access[access]
        # compare_digest keeps the check constant-time once the hash matched
        if not hmac.compare_digest(kp.secret_key, secret) or not kp.is_active:
            raise AuthFailed("Invalid API key.")
        return kp

    async def count_query(self, access_key: str, n: int = 1) -> None:
        await self._store.execute(*self.note_query(access_key, n))

    def note_query(self, access_key: str, n: int = 1) -> tuple[str, tuple[int, str]]:
        """Count ``n`` runs in memory; returns the statement that persists the count."""
        kp = self._by_access[access_key]
        self._by_access[access_key] = replace(kp, total_queries=kp.total_queries + n)
        return ("UPDATE keypairs SET total_queries = total_queries + ? WHERE access_key=?",
                (n, access_key))
