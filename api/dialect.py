"""Error shapes. Each dialect owns one table from core errors to (status, code), looked up along
the exception's MRO, and one function that renders the body; BaseHandler.write_error uses them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from tornado.web import HTTPError

from bridge.disk import disk_full
from bridge.errors import BridgeError, InvalidRequest, NotFound

Body = dict[str, Any] | list[Any]
INTERNAL_ERROR = "Internal server error"


class MalformedBody(InvalidRequest):
    """The request body is not JSON, or not the JSON this route takes."""


class MethodNotAllowed(InvalidRequest):
    pass


def check_encodable(value: Any, where: str = "body") -> Any:
    """``value`` (parsed JSON) unchanged, or MalformedBody when a string in it cannot be UTF-8:
    a lone surrogate from an escape like ``"\\ud800"``. SQLite, the kernels' wire and every
    client need UTF-8, so such text is refused at the door, in every field of every dialect.
    """
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise MalformedBody(
                        f"{path}: text is not valid Unicode ({exc.reason} at character "
                        f"{exc.start}); lone surrogates cannot be stored or run.") from None
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((f"{path} key", k))
                stack.append((f"{path}.{k}", v))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return value


class RouteNotFound(NotFound):
    """No route has this path: every dialect's generic 404, never one about a missing kernel."""

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"No route for {method} {path}. The API is described at "
                         "/api/openapi.json and /api/docs.")


@dataclass(frozen=True)
class Dialect:
    name: str
    table: Mapping[type[BaseException], tuple[int, str]]
    render: Callable[[int, str, str], Body]
    content_type: str = "application/json"

    def lookup(self, exc: BaseException | None, status: int) -> tuple[int, str, str]:
        """(status, code, message) for an exception, or for a bare HTTP status."""
        if isinstance(exc, HTTPError):
            code = exc.status_code
            message = exc.log_message or exc.reason or HTTPStatus(code).phrase
            return code, self._code_for_status(code), message
        # No space (the server's disk, SQLite's file, a quota'd dir), wherever it was hit: 507.
        exc = disk_full(exc) or exc
        if exc is not None:
            for cls in type(exc).__mro__:
                if cls in self.table:
                    code, slug = self.table[cls]
                    # Never an unexpected exception's own text: it may carry internals
                    # (paths, queries). The log has it.
                    message = (exc.message if isinstance(exc, BridgeError)
                               else INTERNAL_ERROR)
                    return code, slug, message
        return status, self._code_for_status(status), HTTPStatus(status).phrase

    def _code_for_status(self, status: int) -> str:
        for code, slug in self.table.values():
            if code == status:
                return slug
        return HTTPStatus(status).phrase.lower().replace(" ", "-")
