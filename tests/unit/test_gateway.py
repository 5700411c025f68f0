"""Unit tests of how a Jupyter session's activity follows the kernel's iopub statuses."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from bridge.gateway import Gateway

from .sessions_support import make_session


def status(state: str, parent: str) -> dict[str, Any]:
    return {"header": {"msg_type": "status", "msg_id": f"s-{parent}-{state}"},
            "parent_header": {"msg_id": parent}, "content": {"execution_state": state}}


def gateway_and_session() -> tuple[Gateway, Any]:
    sessions: Any = SimpleNamespace(on_terminated=[])
    return Gateway(sessions, None), make_session()  # type: ignore[arg-type]


def test_the_servers_own_requests_do_not_make_the_kernel_busy() -> None:
    """A readiness probe after a restart, or a relay's connect-time nudge, is not a cell."""
    gw, session = gateway_and_session()
    gw.observe(session, status("busy", "probe"))
    assert not session.busy
    assert gw._activity_of(session).execution_state == "idle"


def test_a_clients_request_holds_the_session_until_idle() -> None:
    gw, session = gateway_and_session()
    gw.sent(session, "cell")
    gw.observe(session, status("busy", "cell"))
    assert session.busy and gw._activity_of(session).execution_state == "busy"
    gw.observe(session, status("busy", "probe"))
    gw.observe(session, status("idle", "probe"))  # someone else's idle: the cell still runs
    assert session.busy and gw._activity_of(session).execution_state == "busy"
    gw.observe(session, status("idle", "cell"))
    assert not session.busy and gw._activity_of(session).execution_state == "idle"
