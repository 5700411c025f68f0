"""What a session is rebuilt from after a restart (bridge/adoption.py), without a server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bridge.adoption import config_of, one_shot, rebuild
from bridge.errors import UnknownLanguage
from bridge.languages import resolve
from bridge.sandbox import Mount
from bridge.session import Limits, Session
from bridge.store import SqliteStore, Store, dumps


def _session(**kw: object) -> Session:
    base: dict[str, object] = dict(
        id="0b8e", name="nb", access_key="AK", language=resolve("python"), origin="backendai",
        limits=Limits(query_timeout_ms=5000, max_cpu_credit_ms=0, mem_kib=262144,
                      idle_timeout_s=30.0),
        workdir=Path("/data/sessions/pool-1"),
        mounts=(Mount(Path("/data/folders/f1"), "data", read_only=True),),
        environ={"STAGE": "dev"}, network=True, on_timeout="restart", kernelspec="python3")
    base.update(kw)
    return Session(**base)  # type: ignore[arg-type]


def _row(s: Session) -> dict[str, object]:
    return {"id": s.id, "name": s.name, "access_key": s.access_key,
            "language": s.language.name, "origin": s.origin, "state": s.state.value,
            "state_reason": s.state_reason, "config": dumps(config_of(s)),
            "created_at": s.created_at}


def test_a_session_is_rebuilt_as_it_was() -> None:
    s = _session()
    back = rebuild(_row(s))
    for attr in ("id", "name", "access_key", "language", "origin", "limits", "workdir",
                 "mounts", "environ", "network", "on_timeout", "kernelspec", "created_at"):
        assert getattr(back, attr) == getattr(s, attr), attr
    # The pooled kernel's dir, not sessions/<id>: the files are where the kernel wrote them.
    assert back.workdir == Path("/data/sessions/pool-1")


def test_a_row_it_cannot_rebuild_raises() -> None:
    row = _row(_session())
    older = dict(row, config=json.dumps({"limits": {}, "mounts": [], "environ": {}}))
    with pytest.raises(KeyError):
        rebuild(older)  # a first-release row: no workdir, no mount specs
    with pytest.raises(UnknownLanguage):
        rebuild(dict(row, language="cobol"))


def test_one_shots_are_not_kept() -> None:
    assert one_shot(_session(origin="notebook"))
    assert one_shot(_session(origin="sandbox", name="0b8e"))  # unnamed: its name is its id
    assert not one_shot(_session(origin="sandbox", name="my-session"))
    assert not one_shot(_session(origin="jupyter"))


# -- readopt over a real SQLite store and a registry that only records ---------------------------

class Registry:
    """Stands in for Sessions: what re-adoption asks of the registry."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.joined: dict[str, object] = {}  # session id → its kernel (None: left in ERROR)
        self.destroyed: list[tuple[str, str]] = []

    def registered(self, session_id: str) -> bool:
        return session_id in self.joined

    def readopt(self, session: Session, kernel: object) -> None:
        self.joined[session.id] = kernel

    async def destroy(self, session: Session, reason: str, *, now: bool = False) -> None:
        self.destroyed.append((session.id, reason))


def test_readopt_adopts_ends_and_explains(tmp_path: Path) -> None:
    from bridge.adoption import KERNEL_GONE, RUN_LOST, readopt
    from bridge.errors import KernelGone
    from bridge.runs import RunState

    async def scenario() -> None:
        store = SqliteStore(tmp_path / "db.sqlite3")
        await store.open()
        try:
            live, dead = _session(id="live", name="live"), _session(id="dead", name="dead")
            shot = _session(id="shot", name="shot", origin="notebook")
            for s in (live, dead, shot):
                await store.execute(
                    "INSERT INTO sessions (id, name, access_key, language, origin, state,"
                    " config, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    tuple(_row(s)[k] for k in ("id", "name", "access_key", "language",
                                               "origin", "state", "config", "created_at")))
                await store.execute(
                    "INSERT INTO kernels (session_id, role, record, updated_at) VALUES"
                    " (?, 'main', ?, 'now')", (s.id, json.dumps({"for": s.id})))
            await store.execute(  # a first-release row: cannot be rebuilt
                "INSERT INTO sessions (id, name, access_key, language, origin, state, config,"
                " created_at) VALUES ('old', 'old', 'AK', 'python', 'backendai', 'RUNNING',"
                " '{}', 'then')")
            await store.execute(  # the run the killed server had in flight
                "INSERT INTO runs (id, session_id, run_id, mode, code, status, created_at)"
                " VALUES ('r', 'live', 'slow', 'query', 'sleep', 'queued', 'then')")
            registry = Registry(store)

            async def adopt(record: dict[str, object]) -> object:
                if record["for"] == "dead":
                    raise KernelGone("Kernel 'kb-python' is gone: it was killed.")
                return f"kernel of {record['for']}"

            done = await readopt(registry, adopt)  # type: ignore[arg-type]

            assert registry.joined == {"live": "kernel of live", "dead": None,
                                       "shot": "kernel of shot"}
            assert [s.id for s in done.sessions] == ["live"] and done.ended == ["old", "shot"]
            assert registry.destroyed == [("shot", "server-restarted")]  # a one-shot's
            rows = {r["id"]: (r["state"], r["state_reason"]) for r in await store.fetchall(
                "SELECT id, state, state_reason FROM sessions")}
            assert rows["dead"] == ("ERROR", KERNEL_GONE) and rows["live"][0] == "RUNNING"
            assert rows["old"] == ("TERMINATED", "server-restarted")
            kept = {r["session_id"] for r in await store.fetchall("SELECT * FROM kernels")}
            assert kept == {"live", "shot"}  # (shot's goes with its destroy, faked here)
            # The lost run ends, recorded, with a reason its client reads on its next call.
            run = done.sessions[0].get_run("slow")
            assert run.state is RunState.CANCELLED and run.text("stderr") == RUN_LOST + "\n"
            row = await store.fetchone("SELECT status, exit_code FROM runs WHERE run_id='slow'")
            assert row == {"status": "failed", "exit_code": 130}
        finally:
            await store.close()

    asyncio.run(scenario())
