"""The store interface every module writes to, whichever database is behind it.

Callers write one SQL text for both backends:

- ``?`` placeholders (the PostgreSQL backend turns them into its own, outside string literals);
- portable statements: ``INSERT … ON CONFLICT (key) DO UPDATE SET c = excluded.c`` or
  ``… DO NOTHING`` (never ``INSERT OR REPLACE/IGNORE``; :func:`upsert` writes the former),
  ``RETURNING`` through :meth:`Store.fetchone`, a subquery in ``FROM`` with an alias;
- booleans as 0/1 in ``INTEGER`` columns (a Python ``bool`` is sent as an int);
- :meth:`Store.execute` answers the number of rows changed, the same in both.

Writes (:meth:`~Store.execute`, :meth:`~Store.transaction`, and the lease calls) are applied in
the order they were called, one at a time, and committed before the call returns: a later save
of a row never loses to an earlier one.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any, ClassVar

Row = dict[str, Any]


class Store(abc.ABC):
    """Async access to the server's tables; opened (and migrated) by :meth:`open`."""

    dialect: ClassVar[str]
    # SQL for "now" on the database's clock, in Unix seconds (DOUBLE PRECISION).
    now_sql: ClassVar[str]

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply the migrations this database lacks.

        Raises StartupRefused when the database cannot be reached or is newer than this code.
        """

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the data is, for a log line (no password)."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of changed rows."""

    @abc.abstractmethod
    async def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Several statements, atomically."""

    @abc.abstractmethod
    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    @abc.abstractmethod
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def schema_version(self) -> int:
        row = await self.fetchone("SELECT MAX(version) AS v FROM schema_version")
        return int(row["v"]) if row and row["v"] is not None else 0

    # -- leases: a named claim that expires unless renewed (timers that must fire once) -------

    async def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take ``name`` for ``ttl_s`` seconds if it is free or expired, or extend it if
        ``holder`` has it already. True when ``holder`` holds it now. One statement: two
        callers racing for a free lease never both get it."""
        changed = await self.execute(
            f"INSERT INTO leases (name, holder, expires, acquired) VALUES (?, ?, {self.now_sql}"
            f" + ?, {self.now_sql}) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
            " expires = excluded.expires, acquired = CASE WHEN leases.holder = excluded.holder"
            " THEN leases.acquired ELSE excluded.acquired END"
            f" WHERE leases.holder = excluded.holder OR leases.expires <= {self.now_sql}",
            (name, holder, float(ttl_s)))
        return changed == 1

    async def renew(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend a lease ``holder`` still holds. False once it expired (another may have
        taken it since, or may any moment): the holder must stop acting on it."""
        changed = await self.execute(
            f"UPDATE leases SET expires = {self.now_sql} + ? WHERE name = ? AND holder = ?"
            f" AND expires > {self.now_sql}", (float(ttl_s), name, holder))
        return changed == 1

    async def release(self, name: str, holder: str) -> bool:
        """Give the lease up (a no-op unless ``holder`` has it); True if it was held."""
        return await self.execute(
            "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)) == 1

    async def lease_holder(self, name: str) -> str | None:
        """Who holds ``name`` now (None: free or expired)."""
        row = await self.fetchone(
            f"SELECT holder FROM leases WHERE name = ? AND expires > {self.now_sql}", (name,))
        return str(row["holder"]) if row is not None else None

    async def leases(self, prefix: str) -> dict[str, str]:
        """The unexpired leases whose name starts with ``prefix``: name → holder."""
        rows = await self.fetchall(
            f"SELECT name, holder FROM leases WHERE expires > {self.now_sql} ORDER BY name")
        return {r["name"]: r["holder"] for r in rows if str(r["name"]).startswith(prefix)}


def upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    """``INSERT`` a whole row, or overwrite the one with the same ``key`` (both dialects).

    >>> upsert("t", ["id", "a"], ["id"])
    'INSERT INTO t (id, a) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET a = excluded.a'
    """
    rest = [c for c in columns if c not in key]
    action = ("DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest)
              if rest else "DO NOTHING")
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            f"({', '.join('?' * len(columns))}) ON CONFLICT ({', '.join(key)}) {action}")


def columns(text: str) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]`` (the modules keep their column lists as text)."""
    return [c.strip() for c in text.split(",") if c.strip()]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
