"""Jupyter Server's error bodies ``{"message", "reason"}``, and the one table that maps core
errors to them."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from bridge import errors as e

from ..auth import BadSignatureParams
from ..dialect import Dialect, MalformedBody, MethodNotAllowed

TABLE: dict[type[BaseException], tuple[int, str]] = {
    MalformedBody: (400, "Bad Request"),
    BadSignatureParams: (400, "Bad Request"),
    e.InvalidRequest: (400, "Bad Request"),
    e.AuthFailed: (401, "Unauthorized"),
    e.Forbidden: (403, "Forbidden"),
    e.NotFound: (404, "Not Found"),
    MethodNotAllowed: (405, "Method Not Allowed"),
    e.Conflict: (409, "Conflict"),
    # Jupyter Server answers a kernel that cannot start with 500; a client of ours must tell
    # "over quota" from "broken", so quota is 403 as jupyter_server's own max-kernels limit.
    e.QuotaExceeded: (403, "Forbidden"),
    e.RateLimited: (429, "Too Many Requests"),
    e.KernelError: (503, "Service Unavailable"),
    e.StoreUnavailable: (503, "Service Unavailable"),
    e.DiskFull: (507, "Insufficient Storage"),
    e.BridgeError: (400, "Bad Request"),
    Exception: (500, "Internal Server Error"),
}


def render(status: int, reason: str, message: str) -> dict[str, Any]:
    return {"message": message, "reason": reason or HTTPStatus(status).phrase}


JUPYTER = Dialect("jupyter", TABLE, render)
