"""What a session is rebuilt from after a restart (bridge/adoption.py), without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.adoption import config_of, one_shot, rebuild
from bridge.errors import UnknownLanguage
from bridge.languages import resolve
from bridge.sandbox import Mount
from bridge.session import Limits, Session
from bridge.store import dumps


def _session(**kw: object) -> Session:
    base: dict[str, object] = dict(
        id="0b8e", name="nb", access_key="AK", language=resolve("python"), origin="backendai",
        limits=Limits(query_timeout_ms=5000, max_cpu_credit_ms=0, mem_kib=262144,
                      idle_timeout_s=30.0),
        workdir=Path("/data/sessions/pool-1"),
        mounts=(Mount(Path("/data/folders/f1"), "data", read_only=True),),
        environ={"STAGE": "dev"}, network=True, on_timeout="restart")
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
                 "mounts", "environ", "network", "on_timeout", "created_at"):
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
