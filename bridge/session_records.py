"""The sessions' and runs' rows in the store: every write the session registry and its worker make.

The registry keeps live sessions in memory; these rows are what outlives them (their state,
config and final usage, every run's status and exit code).
"""

from __future__ import annotations

import uuid
from typing import Any

from . import adoption
from .kernels import Usage
from .runs import Run, RunState
from .session import Session, now_iso
from .store import Store, dumps

SERVER_RESTARTED = "server-restarted"


class SessionRecords:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.owner: str | None = None  # this replica's id when replicas share the store

    async def end_all(self, reason: str = SERVER_RESTARTED) -> None:
        """Every session not yet ended is, now (its kernel went with the last process)."""
        await self.store.execute(
            "UPDATE sessions SET state='TERMINATED', state_reason=?, terminated_at=?"
            " WHERE state != 'TERMINATED'", (reason, now_iso()))

    async def created(self, session: Session) -> None:
        """The row and the kernel's record together, before anyone is told: a server that
        starts after this one died finds the kernel (bridge/adoption.py)."""
        await self.store.transaction([
            ("INSERT INTO sessions (id, name, access_key, language, origin, state, config,"
             " created_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (session.id, session.name, session.access_key, session.language.name,
              session.origin, session.state.value, dumps(adoption.config_of(session)),
              session.created_at, self.owner)),
            adoption.record_statement(session)])

    async def set_state(self, session: Session) -> None:
        await self.store.execute(
            "UPDATE sessions SET state=?, state_reason=? WHERE id=?",
            (session.state.value, session.state_reason, session.id))

    async def restarted(self, session: Session) -> None:
        """Back to RUNNING with a new kernel process: its state and its record."""
        await self.store.transaction([
            ("UPDATE sessions SET state=?, state_reason=? WHERE id=?",
             (session.state.value, session.state_reason, session.id)),
            adoption.record_statement(session)])

    async def ended(self, session: Session, reason: str, usage: Usage) -> None:
        stats = {"cpu_used": usage.cpu_ms, "mem_max_bytes": usage.mem_max_bytes,
                 "mem_cur_bytes": usage.mem_bytes}
        await self.store.transaction([
            ("UPDATE sessions SET state='TERMINATED', state_reason=?, terminated_at=?,"
             " stats=? WHERE id=?", (reason, now_iso(), dumps(stats), session.id)),
            adoption.forget_statement(session.id)])

    @staticmethod
    def run_queued(session: Session, run: Run) -> tuple[str, tuple[Any, ...]]:
        """The statement that records a queued run (for a transaction with others)."""
        return ("INSERT INTO runs (id, session_id, run_id, mode, code, options, status,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (str(uuid.uuid4()), session.id, run.run_id, run.mode, run.code,
                 dumps(run.options), RunState.QUEUED.value, now_iso()))

    async def run_ended(self, session: Session, run: Run) -> None:
        await self.store.execute(
            "UPDATE runs SET status=?, exit_code=?, finished_at=? WHERE session_id=? AND"
            " run_id=?", (run.state.value, run.exit_code, now_iso(), session.id, run.run_id))
