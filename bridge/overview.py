"""What the web console shows a keypair: its live sessions with usage, its recent executions.

Read-only views over the registry and the store; the console's handlers (api/webconsole.py)
render them. Job sessions the console reads through the jobs dialect's own API.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .service import Bridge

RECENT = 20


def sessions(bridge: Bridge, access_key: str) -> list[dict[str, Any]]:
    """The keypair's live sessions of every dialect, newest first."""
    now = time.monotonic()
    rows = []
    for s in bridge.sessions.all(access_key):
        usage = s.usage()
        rows.append({
            "id": s.id, "name": s.name, "dialect": s.origin, "language": s.language.name,
            "state": s.state.value, "mem_bytes": usage.mem_bytes, "cpu_ms": usage.cpu_ms,
            "age_s": round(now - s.started, 1), "queries": s.num_queries,
            "created_at": s.created_at,
        })
    return sorted(rows, key=lambda r: r["created_at"], reverse=True)


async def recent_executions(bridge: Bridge, access_key: str,
                            limit: int = RECENT) -> list[dict[str, Any]]:
    """The keypair's latest Sandbox executions (any way in: sync, async, batch, the console)."""
    rows = await bridge.store.fetchall(
        "SELECT id, language, session_id, status, result, created_at, completed_at"
        " FROM executions WHERE access_key=? ORDER BY created_at DESC LIMIT ?",
        (access_key, limit))
    out = []
    for r in rows:
        result = json.loads(r["result"]) if r["result"] else {}
        out.append({"id": r["id"], "language": r["language"], "session_id": r["session_id"],
                    "status": r["status"], "exit_code": result.get("exit_code"),
                    "execution_time": result.get("execution_time"),
                    "created_at": r["created_at"], "completed_at": r["completed_at"]})
    return out
