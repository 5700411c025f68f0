"""Moving a SQLite data dir's durable records into another store (``kernel-bridge db
import-sqlite``): an operator who goes from one server to replicas on PostgreSQL keeps the
keypairs its clients hold, and its folders (whose files stay in the data dir).

Sessions, runs, executions, jobs and event streams are not copied: they are the old server's
live state and history, ended when it stopped.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .base import Store

DURABLE = ("keypairs", "vfolders", "vfolder_permissions", "vfolder_invitations")


async def import_sqlite(path: Path, dest: Store) -> dict[str, tuple[int, int]]:
    """Copy ``DURABLE`` tables' rows from the SQLite file at ``path`` (opened read-only) into
    ``dest``; a row whose key ``dest`` has already is left as it is there. Returns, per table,
    (rows copied, rows found)."""
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found: dict[str, tuple[list[str], list[tuple[object, ...]]]] = {}
        for table in DURABLE:
            cols = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
            rows = src.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall() if cols \
                else []
            found[table] = (cols, rows)
    finally:
        src.close()
    copied: dict[str, tuple[int, int]] = {}
    for table, (cols, rows) in found.items():
        sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
               " ON CONFLICT DO NOTHING")
        n = 0
        for row in rows:
            n += await dest.execute(sql, row)
        copied[table] = (n, len(rows))
    return copied
