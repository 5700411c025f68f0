"""Every table, as numbered steps both backends apply at start, in order, each once.

A step is never edited once released: a new column or table is a new step at the end (the next
number), so a data dir or database made by any release reaches the same schema. Step 1 is the
first release's tables, written ``IF NOT EXISTS``: a first-release SQLite file (which has no
``schema_version`` table) takes it as a no-op and is then at version 1.

Write portable DDL: ``TEXT``, ``INTEGER``/``BIGINT``, ``DOUBLE PRECISION`` (not ``REAL``, which
is 4 bytes in PostgreSQL: a Unix time loses its seconds), booleans as ``INTEGER`` 0/1. Where the
dialects must differ, a statement is a :class:`PerDialect`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerDialect:
    sqlite: str
    postgres: str

    def text(self, dialect: str) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgres


Statement = str | PerDialect


@dataclass(frozen=True)
class Step:
    version: int
    name: str
    statements: tuple[Statement, ...]

    def sql(self, dialect: str) -> list[str]:
        return [s if isinstance(s, str) else s.text(dialect) for s in self.statements]


# The table that records which steps ran; made before any step, by the runner.
VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL)"""

_EVENTS_TABLE = """CREATE TABLE IF NOT EXISTS events (
        key   TEXT NOT NULL,
        id    INTEGER NOT NULL,
        event TEXT NOT NULL,
        data  TEXT NOT NULL,
        PRIMARY KEY (key, id))"""

FIRST_RELEASE = Step(1, "first release: keypairs, sessions, runs, folders, jobs, executions, "
                        "events", (
    # -- keypairs and Backend.AI sessions (bridge/keypairs.py, bridge/sessions.py) --
    """CREATE TABLE IF NOT EXISTS keypairs (
        access_key   TEXT PRIMARY KEY,
        secret_key   TEXT NOT NULL,
        secret_hash  TEXT NOT NULL UNIQUE,
        is_active    INTEGER NOT NULL DEFAULT 1,
        concurrency  INTEGER NOT NULL,
        total_queries BIGINT NOT NULL DEFAULT 0,
        created      TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sessions (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        access_key   TEXT NOT NULL,
        language     TEXT NOT NULL,
        origin       TEXT NOT NULL,
        state        TEXT NOT NULL,
        state_reason TEXT,
        config       TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        terminated_at TEXT,
        stats        TEXT)""",
    "CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (access_key, name)",
    """CREATE TABLE IF NOT EXISTS runs (
        id           TEXT PRIMARY KEY,
        session_id   TEXT NOT NULL,
        run_id       TEXT NOT NULL,
        mode         TEXT NOT NULL,
        code         TEXT NOT NULL,
        options      TEXT,
        status       TEXT NOT NULL,
        exit_code    INTEGER,
        created_at   TEXT NOT NULL,
        finished_at  TEXT)""",
    "CREATE INDEX IF NOT EXISTS runs_session ON runs (session_id, run_id)",
    # -- virtual folders (bridge/folders.py) --
    """CREATE TABLE IF NOT EXISTS vfolders (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        owner        TEXT NOT NULL,
        created      TEXT NOT NULL,
        UNIQUE (owner, name))""",
    """CREATE TABLE IF NOT EXISTS vfolder_permissions (
        folder_id    TEXT NOT NULL,
        access_key   TEXT NOT NULL,
        permission   TEXT NOT NULL,
        PRIMARY KEY (folder_id, access_key))""",
    """CREATE TABLE IF NOT EXISTS vfolder_invitations (
        id           TEXT PRIMARY KEY,
        folder_id    TEXT NOT NULL,
        inviter      TEXT NOT NULL,
        invitee      TEXT NOT NULL,
        permission   TEXT NOT NULL,
        state        TEXT NOT NULL,
        created_at   TEXT NOT NULL)""",
    # -- job sessions and their jobs (bridge/jobs.py, bridge/job_sessions.py); times are Unix
    # seconds --
    """CREATE TABLE IF NOT EXISTS job_sessions (
        id              TEXT PRIMARY KEY,
        access_key      TEXT NOT NULL,
        mode            TEXT NOT NULL,
        language        TEXT NOT NULL,
        environment     TEXT NOT NULL,
        max_ttl         INTEGER NOT NULL,
        interactive_ttl INTEGER NOT NULL,
        state           TEXT NOT NULL,
        state_reason    TEXT NOT NULL,
        accepting_jobs  INTEGER NOT NULL,
        close_reason    TEXT,
        started_at      DOUBLE PRECISION NOT NULL,
        activated_at    DOUBLE PRECISION,
        closed_at       DOUBLE PRECISION,
        last_job_started   DOUBLE PRECISION,
        last_job_completed DOUBLE PRECISION,
        timestamps      TEXT NOT NULL,
        elapsed         DOUBLE PRECISION NOT NULL,
        max_deadline    DOUBLE PRECISION,
        idle_deadline   DOUBLE PRECISION,
        open_deadline   DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS job_sessions_owner ON job_sessions (access_key, started_at)",
    """CREATE TABLE IF NOT EXISTS jobs (
        id             TEXT PRIMARY KEY,
        session_id     TEXT NOT NULL,
        access_key     TEXT NOT NULL,
        seq            INTEGER NOT NULL,
        code           TEXT NOT NULL,
        stdin          TEXT,
        environment    TEXT NOT NULL,
        timeout        DOUBLE PRECISION NOT NULL,
        language       TEXT NOT NULL,
        status         TEXT NOT NULL,
        stdout         TEXT NOT NULL,
        stderr         TEXT NOT NULL,
        exit_code      INTEGER,
        execution_time DOUBLE PRECISION,
        created_at     DOUBLE PRECISION NOT NULL,
        started_at     DOUBLE PRECISION,
        completed_at   DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS jobs_session ON jobs (session_id, seq)",
    # -- Sandbox executions (bridge/executions.py) --
    """CREATE TABLE IF NOT EXISTS executions (
        id           TEXT PRIMARY KEY,
        access_key   TEXT NOT NULL,
        language     TEXT NOT NULL,
        session_id   TEXT,
        status       TEXT NOT NULL,
        error        TEXT,
        result       TEXT,
        created_at   TEXT NOT NULL,
        started_at   TEXT,
        completed_at TEXT)""",
    "CREATE INDEX IF NOT EXISTS executions_created ON executions (created_at)",
    # -- event streams (bridge/events.py) --
    """CREATE TABLE IF NOT EXISTS event_streams (
        key        TEXT PRIMARY KEY,
        access_key TEXT NOT NULL,
        owner      TEXT NOT NULL,
        name       TEXT,
        run_id     TEXT,
        created_at TEXT NOT NULL,
        first_id   INTEGER NOT NULL DEFAULT 1,
        last_id    INTEGER NOT NULL DEFAULT 0,
        ended      INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS event_streams_run ON event_streams (access_key, run_id)",
    # Events are read by (key, id) only: SQLite keeps them in the key's order, without a rowid.
    PerDialect(sqlite=_EVENTS_TABLE + " WITHOUT ROWID", postgres=_EVENTS_TABLE),
))

LEASES = Step(2, "leases: named, expiring claims (bridge/store/base.py)", (
    # `expires` is the database's clock in Unix seconds: replicas on hosts whose clocks differ
    # still agree on who holds what.
    """CREATE TABLE leases (
        name     TEXT PRIMARY KEY,
        holder   TEXT NOT NULL,
        expires  DOUBLE PRECISION NOT NULL,
        acquired DOUBLE PRECISION NOT NULL)""",
))

REPLICAS = Step(3, "replicas: the cluster secret, each replica's URL, who owns what "
                   "(bridge/replicas.py)", (
    # One row per cluster-wide value; "secret" signs the identity of forwarded requests.
    """CREATE TABLE cluster (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # Where each replica that ever ran is reached; alive while its lease replica:<id> holds.
    """CREATE TABLE replicas (
        id         TEXT PRIMARY KEY,
        url        TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL)""",
    # The replica whose kernels serve a session, an async execution, a job session.
    "ALTER TABLE sessions ADD COLUMN owner TEXT",
    "ALTER TABLE executions ADD COLUMN owner TEXT",
    "ALTER TABLE job_sessions ADD COLUMN owner TEXT",
    "CREATE INDEX sessions_by_owner ON sessions (owner, state)",
    # Sandbox executions per keypair per minute (Unix time // 60), counted by every replica.
    """CREATE TABLE rate_counts (
        access_key TEXT NOT NULL,
        minute     BIGINT NOT NULL,
        n          INTEGER NOT NULL,
        PRIMARY KEY (access_key, minute))""",
))

KERNELS = Step(4, "kernels: what reaches a live session's kernels (bridge/adoption.py)", (
    # Kernel.record() as JSON, one row per kernel a live session holds (role "main": its
    # language kernel); written with the session's row, gone with it. It holds the kernel's key.
    """CREATE TABLE kernels (
        session_id   TEXT NOT NULL,
        role         TEXT NOT NULL,
        record       TEXT NOT NULL,
        updated_at   TEXT NOT NULL,
        PRIMARY KEY (session_id, role))""",
))

# In order, numbered 1, 2, 3, … without gaps (tests/unit/test_store.py checks it).
STEPS: tuple[Step, ...] = (FIRST_RELEASE, LEASES, REPLICAS, KERNELS)
LATEST = STEPS[-1].version
