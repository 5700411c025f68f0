"""Backend.AI's RFC 7807 problem bodies, and the one table that maps core errors to them."""

from __future__ import annotations

from typing import Any

from bridge import errors as e

from ..auth import BadSignatureParams
from ..dialect import Dialect, MalformedBody, MethodNotAllowed

PROBLEM_BASE = "https://api.backend.ai/probs/"

TABLE: dict[type[BaseException], tuple[int, str]] = {
    MalformedBody: (400, "invalid-api-params"),
    BadSignatureParams: (400, "invalid-auth-params"),
    e.InvalidRequest: (400, "invalid-api-params"),
    e.UnknownLanguage: (400, "invalid-api-params"),
    e.UnsafePath: (400, "invalid-api-params"),
    e.LimitExceeded: (406, "not-acceptable"),
    e.AuthFailed: (401, "auth-failed"),
    e.Forbidden: (403, "forbidden"),
    # A bare 404 takes the first slug listed for it: the generic one.
    e.NotFound: (404, "generic-not-found"),
    e.SessionNotFound: (404, "kernel-not-found"),
    MethodNotAllowed: (405, "method-not-allowed"),
    e.Conflict: (409, "generic-conflict"),
    e.QuotaExceeded: (412, "quota-exceeded"),
    e.RateLimited: (429, "rate-limit-exceeded"),
    e.KernelError: (503, "kernel-creation-failed"),
    e.StoreUnavailable: (503, "service-unavailable"),
    e.DiskFull: (507, "insufficient-storage"),
    e.BridgeError: (400, "generic-bad-request"),
    Exception: (500, "internal-server-error"),
}

_TITLES = {
    "invalid-api-params": "Missing or invalid API parameters.",
    "invalid-auth-params": "Missing or invalid authorization parameters.",
    "not-acceptable": "The requested resource limits exceed the server's limits.",
    "auth-failed": "Credential/signature mismatch.",
    "forbidden": "Forbidden operation.",
    "kernel-not-found": "No such kernel.",
    "generic-not-found": "Not found.",
    "method-not-allowed": "Method not allowed.",
    "generic-conflict": "The request conflicts with the current state.",
    "quota-exceeded": "You have reached your resource limit.",
    "rate-limit-exceeded": "Rate limit exceeded.",
    "kernel-creation-failed": "Kernel creation failed.",
    "insufficient-storage": "Not enough storage to complete the request.",
    "service-unavailable": "Service unavailable; retry shortly.",
    "generic-bad-request": "Bad request.",
    "internal-server-error": "Something has gone wrong.",
}


def render(status: int, slug: str, message: str) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + slug, "title": _TITLES.get(slug, message), "msg": message}


BACKENDAI = Dialect("backendai", TABLE, render, content_type="application/problem+json")
