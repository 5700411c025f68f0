"""Each dialect's one error table: every core error maps to its status and the dialect's shape."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from api.backendai.errors import BACKENDAI
from api.dialect import Dialect
from api.jobs.errors import IBM
from api.jupyter.errors import JUPYTER
from api.sandbox.errors import SANDBOX
from bridge import errors as e

CORE_ERRORS = [cls for _, cls in inspect.getmembers(e, inspect.isclass)
               if issubclass(cls, e.BridgeError) and cls is not e.BridgeError]

# The status of each family of core errors, per dialect (the nearest family in an error's MRO).
FAMILIES: dict[str, dict[type[e.BridgeError], int]] = {
    "backendai": {e.NotFound: 404, e.InvalidRequest: 400, e.LimitExceeded: 406,
                  e.AuthFailed: 401, e.Forbidden: 403, e.QuotaExceeded: 412,
                  e.RateLimited: 429, e.DiskFull: 507, e.Conflict: 409, e.KernelError: 503,
                  e.StoreUnavailable: 503},
    "sandbox": {e.NotFound: 404, e.InvalidRequest: 400, e.AuthFailed: 403, e.Forbidden: 403,
                e.QuotaExceeded: 429, e.HostBudgetExceeded: 503, e.RateLimited: 429,
                e.DiskFull: 507, e.Conflict: 409, e.KernelError: 503, e.StoreUnavailable: 503},
    "jobs": {e.NotFound: 404, e.InvalidRequest: 400, e.AuthFailed: 401, e.Forbidden: 403,
             e.QuotaExceeded: 429, e.RateLimited: 429, e.DiskFull: 507, e.Conflict: 409,
             e.KernelError: 503, e.StoreUnavailable: 503},
    "jupyter": {e.NotFound: 404, e.InvalidRequest: 400, e.AuthFailed: 401, e.Forbidden: 403,
                e.QuotaExceeded: 403, e.RateLimited: 429, e.DiskFull: 507, e.Conflict: 409,
                e.KernelError: 503, e.StoreUnavailable: 503},
}
DIALECTS = [BACKENDAI, SANDBOX, IBM, JUPYTER]


def instance(cls: type[e.BridgeError]) -> e.BridgeError:
    """An instance whatever the constructor takes; its message is all a lookup reads."""
    exc = cls.__new__(cls)
    exc.message = f"a {cls.__name__}"
    return exc


def expected_status(dialect: Dialect, cls: type[e.BridgeError]) -> int:
    families = FAMILIES[dialect.name]
    return next(families[k] for k in cls.__mro__ if k in families)


def shape_of(dialect: Dialect, body: Any, message: str) -> bool:
    """Whether ``body`` is the dialect's error shape carrying ``message``."""
    if dialect is BACKENDAI:
        return body.keys() == {"type", "title", "msg"} and body["msg"] == message
    if dialect is SANDBOX:
        return body == {"detail": message}
    if dialect is IBM:
        return (body.keys() == {"errors", "trace"} and body["errors"][0]["message"] == message
                and body["errors"][0]["code"])
    return body.keys() == {"message", "reason"} and body["message"] == message


def test_every_core_error_is_listed() -> None:
    # A new family of core errors must be given a status in every dialect (and here).
    assert e.LanguageUnavailable in CORE_ERRORS and len(CORE_ERRORS) >= 20


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
@pytest.mark.parametrize("cls", CORE_ERRORS, ids=lambda c: c.__name__)
def test_core_error_maps_to_its_status_and_shape(dialect: Dialect,
                                                 cls: type[e.BridgeError]) -> None:
    exc = instance(cls)
    status, code, message = dialect.lookup(exc, 500)
    assert status == expected_status(dialect, cls), f"{cls.__name__} in {dialect.name}"
    assert message == exc.message and code
    body = dialect.render(status, code, message)
    assert shape_of(dialect, body, message), body


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_an_unexpected_exception_is_a_500_that_tells_nothing(dialect: Dialect) -> None:
    status, code, message = dialect.lookup(RuntimeError("secret /etc/shadow"), 500)
    assert status == 500
    body = dialect.render(status, code, message)
    assert shape_of(dialect, body, "Internal server error")
    assert "shadow" not in str(body)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_bare_status_takes_the_first_code_listed(dialect: Dialect) -> None:
    status, code, _ = dialect.lookup(None, 404)
    assert status == 404 and code == dialect.lookup(instance(e.NotFound), 500)[1]


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_an_unreachable_database_is_a_503_that_says_retry_shortly(dialect: Dialect) -> None:
    """The store's StoreUnavailable (a lost PostgreSQL connection) is never a 500, and its
    cause (hosts, ports) stays in the log."""
    import psycopg

    try:
        try:
            raise psycopg.OperationalError("connection to 10.0.0.7 port 5432 failed")
        except psycopg.OperationalError as cause:
            raise e.StoreUnavailable() from cause
    except e.StoreUnavailable as exc:
        status, code, message = dialect.lookup(exc, 500)
    assert status == 503 and code
    body = dialect.render(status, code, message)
    assert shape_of(dialect, body, message) and "retry shortly" in message
    assert "10.0.0.7" not in str(body)
