"""A Session with no kernel process and no server: the model alone, for unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge.languages import resolve
from bridge.session import Limits, Session


def make_session(**fields: Any) -> Session:
    defaults: dict[str, Any] = {
        "id": "s1", "name": "s1", "access_key": "AKTEST", "language": resolve("python"),
        "origin": "backendai", "limits": Limits(idle_timeout_s=10.0),
        "workdir": Path("/nonexistent/s1")}
    return Session(**{**defaults, **fields})
