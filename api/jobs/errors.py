"""IBM's error container, ``{"errors": [{"code", "message", "more_info"}], "trace"}``, and the one
table that maps core errors to it. Codes are IBM Cloud style snake_case slugs."""

from __future__ import annotations

import uuid
from typing import Any

from bridge import errors as e

from ..auth import BadSignatureParams
from ..dialect import Dialect, MalformedBody, MethodNotAllowed

MORE_INFO = "https://quantum.cloud.ibm.com/docs/api/qiskit-runtime-rest/tags/sessions"

# A bare status (tornado's own 404/405) takes the first slug listed for it: generic ones first.
TABLE: dict[type[BaseException], tuple[int, str]] = {
    e.InvalidRequest: (400, "bad_request"),
    MalformedBody: (400, "invalid_request_body"),
    BadSignatureParams: (400, "invalid_auth_params"),
    e.UnknownLanguage: (400, "unsupported_language"),
    e.LimitExceeded: (400, "limit_exceeded"),
    e.AuthFailed: (401, "unauthorized"),
    e.Forbidden: (403, "forbidden"),
    e.NotFound: (404, "not_found"),
    e.SessionNotFound: (404, "session_not_found"),
    e.JobNotFound: (404, "job_not_found"),
    MethodNotAllowed: (405, "method_not_allowed"),
    e.Conflict: (409, "conflict"),
    e.InvalidTransition: (409, "invalid_state_transition"),
    e.QuotaExceeded: (429, "quota_exceeded"),
    e.RateLimited: (429, "rate_limited"),
    e.KernelError: (503, "backend_unavailable"),
    e.StoreUnavailable: (503, "service_unavailable"),
    e.DiskFull: (507, "insufficient_storage"),
    e.BridgeError: (400, "bad_request"),
    Exception: (500, "internal_error"),
}


def render(status: int, code: str, message: str) -> dict[str, Any]:
    # The trace is a request id a user can quote; every error body gets a fresh one.
    return {"errors": [{"code": code, "message": message, "more_info": MORE_INFO}],
            "trace": uuid.uuid4().hex}


IBM = Dialect("jobs", TABLE, render)
