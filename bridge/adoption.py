"""Sessions outlive the server: what is persisted to reach a session's kernel again, and the
re-adoption of every live session when a server starts on the data dir.

A session is persisted before its create is answered: its row in ``sessions`` (with the whole
config a Session is rebuilt from) and its kernel's record in ``kernels`` (``Kernel.record()``:
connection info and control handles, whatever another process needs to reach and control it).
On start, every session not TERMINATED is rebuilt and its kernel adopted; a kernel that died
while no server was up leaves its session in ERROR with a reason (a restart brings a new kernel
into the same files), never a 404. Runs cut short by the old server's end are ended with a
reason the client can read. Dialect state lives in the dialects' own tables (job queues,
executions) and is re-read by their own ``start``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BridgeError, KernelStartFailed
from .languages import resolve
from .replicas import owned_by
from .runs import Run, RunState
from .sandbox import Mount
from .session import MAIN, Limits, Session, SessionState, now_iso
from .store import Row, dumps

if TYPE_CHECKING:
    from .kernels import Kernel
    from .sessions import Sessions

log = logging.getLogger(__name__)

# (The kernels table: bridge/store/migrations.py, step KERNELS.)
# Adoptions at once: each is a few round trips to a kernel; more only queue on the loop.
ADOPT_CONCURRENCY = 16
# state_reason of a session whose kernel is gone when the server starts.
KERNEL_GONE = "kernel-died-while-server-down"
NO_RECORD = "kernel-not-recorded"
# (A run's row says "queued" until it ends: whether it had started is not known here.)
RUN_LOST = ("[kernel-bridge: the server stopped before this run ended; its result is lost. "
            "The session and its kernel are intact: run it again if needed.]")

AdoptKernel = Callable[[dict[str, Any]], Awaitable["Kernel"]]


def config_of(session: Session) -> dict[str, Any]:
    """Everything a Session is rebuilt from (besides its row's own columns)."""
    return {"limits": session.limits.__dict__,
            "mounts": [m.target for m in session.mounts],  # (what older readers know)
            "mount_specs": [{"host": str(m.host), "target": m.target,
                             "read_only": m.read_only} for m in session.mounts],
            "environ": session.environ, "workdir": str(session.workdir),
            "network": session.network, "on_timeout": session.on_timeout,
            "kernelspec": session.kernelspec}


def record_of(kernel: Kernel) -> str:
    """The kernel's record as stored (JSON)."""
    return dumps(kernel.record())


def record_statement(session: Session) -> tuple[str, tuple[Any, ...]]:
    """The upsert of the session's main kernel record (after a create or a restart)."""
    assert session.main_kernel is not None
    return ("INSERT INTO kernels (session_id, role, record, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (session_id, role) DO UPDATE SET record=excluded.record,"
            " updated_at=excluded.updated_at",
            (session.id, MAIN, record_of(session.main_kernel), now_iso()))


def forget_statement(session_id: str) -> tuple[str, tuple[Any, ...]]:
    return "DELETE FROM kernels WHERE session_id=?", (session_id,)


def one_shot(session: Session) -> bool:
    return session.origin == "notebook" or (session.origin == "sandbox"
                                            and session.name == session.id)


def rebuild(row: Row) -> Session:
    """A Session from its row. Raises KeyError/ValueError/BridgeError on a row it cannot use."""
    config = json.loads(row["config"])
    mounts = tuple(Mount(host=Path(m["host"]), target=m["target"],
                         read_only=bool(m.get("read_only")))
                   for m in config["mount_specs"])
    session = Session(id=row["id"], name=row["name"], access_key=row["access_key"],
                      language=resolve(row["language"]), origin=row["origin"],
                      limits=Limits(**config["limits"]), workdir=Path(config["workdir"]),
                      mounts=mounts, environ=dict(config.get("environ") or {}),
                      network=bool(config.get("network")),
                      on_timeout=config.get("on_timeout", "destroy"),
                      kernelspec=config.get("kernelspec"), created_at=row["created_at"])
    return session


@dataclass
class Adopted:
    """What a start found: for the log, the sweeps and the README's figures."""

    sessions: list[Session] = field(default_factory=list)
    dead: list[Session] = field(default_factory=list)  # kernel gone: left in ERROR
    ended: list[str] = field(default_factory=list)  # ended TERMINATED: unusable, one-shots
    runs_ended: int = 0
    seconds: float = 0.0

    @property
    def workdirs(self) -> set[Path]:
        return {s.workdir for s in (*self.sessions, *self.dead)}

    @property
    def ipc_dirs(self) -> set[Path]:
        return {k.ipc_dir for s in self.sessions if (k := s.main_kernel) is not None}


async def readopt(sessions: Sessions, adopt: AdoptKernel | None,
                  owner: str | None = None) -> Adopted:
    """Rebuild and register every session a previous server left alive, adopting its kernel.

    ``adopt`` None (no way to reach a kernel from here): every such session is left in ERROR.
    ``owner`` (replicas): only the sessions recorded as that replica's; one already in the
    registry is left as it is.
    """
    started = time.monotonic()
    store = sessions.store
    done = Adopted()
    mine, params = owned_by(owner)
    rows = [r for r in await store.fetchall(
        f"SELECT * FROM sessions WHERE state != 'TERMINATED'{mine}", params)
        if not sessions.registered(str(r["id"]))]
    records = {r["session_id"]: r["record"] for r in await store.fetchall(
        "SELECT session_id, record FROM kernels WHERE role=?", (MAIN,))}
    gate = asyncio.Semaphore(ADOPT_CONCURRENCY)

    async def one(row: Row) -> None:
        try:
            session = rebuild(row)
        except (KeyError, ValueError, TypeError, BridgeError) as exc:
            # A row this release cannot rebuild (an older release's, whose kernels did not
            # survive it anyway): it ends, visibly, with its reason.
            log.warning("session %s cannot be re-adopted (%s): ended", row["id"], exc)
            await store.transaction([
                ("UPDATE sessions SET state='TERMINATED', state_reason=?, terminated_at=?"
                 " WHERE id=?", ("server-restarted", now_iso(), row["id"])),
                forget_statement(row["id"])])
            done.ended.append(row["id"])
            return
        record = records.get(session.id)
        reason = NO_RECORD if record is None or adopt is None else ""
        if row["state"] == SessionState.ERROR.value:  # its kernel died under the old server
            reason = row["state_reason"] or KERNEL_GONE
        if not reason:
            assert record is not None and adopt is not None
            async with gate:
                try:
                    kernel = await adopt(json.loads(record))
                except KernelStartFailed as exc:  # KernelGone: it died while we were down
                    log.info("session %s: kernel gone (%s)", session.id, exc)
                    reason = KERNEL_GONE
                else:
                    sessions.readopt(session, kernel)
                    done.sessions.append(session)
                    return
        session.state, session.state_reason = SessionState.ERROR, reason
        done.dead.append(session)
        sessions.readopt(session, None)

    await asyncio.gather(*(one(r) for r in rows))
    # A one-shot's session (a notebook run, a Sandbox execution without session_id) served the
    # execution the old server lost: nothing in it is wanted any more.
    for s in [s for s in (*done.sessions, *done.dead) if one_shot(s)]:
        (done.sessions if s in done.sessions else done.dead).remove(s)
        done.ended.append(s.id)
        await sessions.destroy(s, "server-restarted", now=True)
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("UPDATE sessions SET state=?, state_reason=? WHERE id=?",
         (s.state.value, s.state_reason, s.id)) for s in done.dead]
    statements += [forget_statement(s.id) for s in done.dead]
    if statements:
        await store.transaction(statements)
    done.runs_ended = await end_lost_runs(sessions, [*done.sessions, *done.dead],
                                          {str(r["id"]) for r in rows})
    done.seconds = time.monotonic() - started
    return done


async def end_lost_runs(sessions: Sessions, live: list[Session], taken: set[str]) -> int:
    """Runs the old server had queued or running end now, each with a reason its client reads
    on its next ``continue`` (Backend.AI: ``finished``, exit code 130, the reason on stderr).
    Only runs of the sessions just ``taken`` up (another live replica's are its own)."""
    by_id = {s.id: s for s in live}
    rows = await sessions.store.fetchall(
        "SELECT session_id, run_id, mode, code, status FROM runs WHERE status IN"
        " ('queued', 'running', 'waiting-input')")
    statements = []
    for r in rows:
        if r["session_id"] not in taken:
            continue
        session = by_id.get(r["session_id"])
        if session is not None and not session.has_run(r["run_id"]):
            run = Run(run_id=r["run_id"], mode=r["mode"], code=r["code"],
                      program=_never)
            run.cancel(RUN_LOST)
            session.add_run(run)
        statements.append((
            "UPDATE runs SET status=?, exit_code=?, finished_at=? WHERE session_id=? AND"
            " run_id=?", (RunState.FAILED.value, 130, now_iso(), r["session_id"], r["run_id"])))
    if statements:
        await sessions.store.transaction(statements)
    return len(statements)


async def _never(run: Run) -> None:  # a lost run's program: it never runs again
    raise AssertionError("a lost run is never executed")
