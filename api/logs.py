"""Logging: the access log (tornado's ``log_function``), request ids, and ``KB_LOG_FORMAT``.

``text`` (the default) keeps the familiar one-line records; ``json`` writes one JSON object per
line for every record, and access records carry ``request_id``, ``dialect``, ``route``,
``method``, ``status``, ``duration_ms``, ``session_id`` and ``access_key``. Never a secret, a
query string (a WebSocket's ``?token=`` is a secret) or code.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from tornado.web import RequestHandler

from bridge import metrics

access_log = logging.getLogger("kernel_bridge.access")
REQUEST_ID_HEADER = "X-Request-Id"
# An incoming id is kept when it is plainly an id: no spaces, quotes or control characters to
# forge log lines or headers with.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Standard LogRecord attributes; anything else on a record is an extra field for JSON output.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def request_id(incoming: str | None) -> str:
    """The client's ``X-Request-Id`` if well formed, else a new one."""
    if incoming and _WELL_FORMED.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Tornado's own access records duplicate ours (and print query strings): ours only.
    logging.getLogger("tornado.access").disabled = True


def route_of(handler: RequestHandler) -> str:
    """The request path with its captured parts (ids, names) as ``{}``: bounded, no ids."""
    path = handler.request.path or "/"
    for arg in handler.path_args:
        if arg:
            path = path.replace(f"/{arg}", "/{}", 1)
    return path


def log_request(handler: RequestHandler) -> None:
    """Tornado's ``log_function``: one access record and the HTTP metrics per request."""
    status = handler.get_status()
    seconds = handler.request.request_time()
    dialect = getattr(getattr(handler, "dialect", None), "name", "none")
    keypair = getattr(handler, "keypair", None)
    fields = {
        "request_id": getattr(handler, "request_id", None),
        "dialect": dialect,
        "route": route_of(handler),
        "method": handler.request.method,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "session_id": getattr(handler, "session_id", None),
        "access_key": getattr(keypair, "access_key", None),
    }
    metrics.HTTP_REQUESTS.labels(dialect, f"{status // 100}xx").inc()
    metrics.HTTP_SECONDS.labels(dialect).observe(seconds)
    reason = metrics.refusal_reason(status, getattr(handler, "error", None))
    if reason is not None:
        metrics.REFUSALS.labels(dialect, reason).inc()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if getattr(handler, "quiet", False) and status < 400:
        return  # probes and scrapes every few seconds would drown the log
    access_log.log(level, "%s %s %s %.2fms id=%s", status, fields["method"], fields["route"],
                   fields["duration_ms"], fields["request_id"], extra=fields)
