"""Persistence: one :class:`Store` interface, SQLite in the data dir by default or PostgreSQL
when ``KB_DATABASE_URL`` is set; the schema is :mod:`bridge.store.migrations`."""

from __future__ import annotations

from ..settings import Settings
from .base import Row, Store, columns, dumps, upsert
from .sqlite import SqliteStore

__all__ = ["Row", "SqliteStore", "Store", "columns", "dumps", "store_for", "upsert"]


def store_for(settings: Settings) -> Store:
    """The store ``settings`` name (not yet opened)."""
    if settings.database_url:
        # Imported here: the SQLite default does not need psycopg to import.
        from .postgres import PostgresStore

        return PostgresStore(settings.database_url)
    return SqliteStore(settings.db_path)
