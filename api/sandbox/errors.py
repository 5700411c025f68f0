"""Nadoo Sandbox's (FastAPI's) ``{"detail": …}`` errors, and the one table mapping core errors
to them. As Nadoo: a missing key is 401, a wrong key 403, a body that does not validate 422."""

from __future__ import annotations

from typing import Any

from bridge import errors as e

from ..auth import BadSignatureParams, MissingCredentials
from ..dialect import Dialect, MalformedBody, MethodNotAllowed

# A bare status (tornado's own 404/405) takes the first slug listed for it.
TABLE: dict[type[BaseException], tuple[int, str]] = {
    e.InvalidRequest: (400, "bad-request"),
    e.UnknownLanguage: (400, "unsupported-language"),
    e.LimitExceeded: (400, "limit-exceeded"),
    BadSignatureParams: (400, "bad-auth-params"),
    MissingCredentials: (401, "missing-api-key"),
    e.AuthFailed: (403, "invalid-api-key"),
    e.Forbidden: (403, "forbidden"),
    e.NotFound: (404, "not-found"),
    MethodNotAllowed: (405, "method-not-allowed"),
    e.Conflict: (409, "conflict"),
    MalformedBody: (422, "unprocessable-entity"),
    # Too many sessions is, to a Sandbox client, too many requests: back off and retry.
    e.QuotaExceeded: (429, "quota-exceeded"),
    # The host, not this keypair, is full: a server-side condition.
    e.HostBudgetExceeded: (503, "host-memory-budget-spent"),
    e.RateLimited: (429, "rate-limited"),
    e.KernelError: (503, "kernel-unavailable"),
    e.StoreUnavailable: (503, "store-unavailable"),
    e.DiskFull: (507, "insufficient-storage"),
    e.BridgeError: (400, "bad-request"),
    Exception: (500, "internal-error"),
}


def render(status: int, code: str, message: str) -> dict[str, Any]:
    if status >= 500:
        # Never the exception's text: it may carry internals. The log has it.
        message = "Internal server error" if status == 500 else message
    return {"detail": message}


SANDBOX = Dialect("sandbox", TABLE, render)
