"""The OpenAPI document at ``GET /api/openapi.json``, generated from each dialect's pydantic
models. Every dialect lists its JSON operations once, as :class:`Operation`s."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bridge import __version__


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    auth: bool = True
    query: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def document(operations: list[Operation]) -> dict[str, Any]:
    models = {m for op in operations for m in (op.body, op.response) if m is not None}
    refs, schemas = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}")
    refs, schemas = _clean_names(refs, schemas)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {"summary": op.summary, "tags": [op.tag], "responses": {}}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"},
                   "description": _PARAMS.get(p, p)} for p in _path_params(op.path)]
        params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"},
                    "description": _PARAMS.get(q, q)} for q in op.query]
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(op.body, "validation")]}}}
        ok: dict[str, Any] = {"description": "OK"}
        if op.response is not None:
            ok["content"] = {"application/json": {"schema": refs[(op.response, "validation")]}}
        entry["responses"][str(op.status)] = ok
        for code in op.errors:
            entry["responses"][str(code)] = {"description": _ERRORS.get(code, "Error")}
        if not op.auth:
            entry["security"] = []
        entry.update(op.extra)
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    for path, ws in WEBSOCKETS.items():
        paths.setdefault(path, {})["get"] = ws
    return {
        "openapi": "3.1.0",
        "info": {"title": "kernel-bridge", "version": __version__,
                 "description": "Backend.AI kernel API, Sandbox execute API, job sessions and "
                                "Jupyter kernels over sandboxed Jupyter kernels. Send the "
                                "secret key as `X-API-Key`. WebSocket routes are marked "
                                "`x-websocket`. Browse this document at /api/docs."},
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
                "backendai": {"type": "apiKey", "in": "header", "name": "Authorization",
                              "description": "BackendAI signMethod=HMAC-SHA256, "
                                             "credential=<access key>:<signature>"},
            },
        },
        "security": [{"apiKey": []}, {"bearer": []}, {"backendai": []}],
    }


# pydantic names a model by its class, and by its module path when two classes share a name
# (api__sandbox__models__ExecuteResponse); a reader wants SandboxExecuteResponse.
_DIALECT_NAMES = {"backendai": "BackendAI", "sandbox": "Sandbox", "jobs": "Jobs",
                  "jupyter": "Jupyter"}


def _clean_names(refs: dict[Any, Any], schemas: dict[str, Any]) -> tuple[dict[Any, Any],
                                                                          dict[str, Any]]:
    renames = {}
    for name in schemas.get("$defs", {}):
        if "__" in name:
            parts = name.split("__")
            dialect = next((_DIALECT_NAMES[p] for p in parts if p in _DIALECT_NAMES), "")
            renames[name] = dialect + parts[-1]
    text = json.dumps([{str(i): v for i, v in enumerate(refs.values())}, schemas])
    for old, new in renames.items():
        text = text.replace(f'"#/components/schemas/{old}"', f'"#/components/schemas/{new}"')
    ref_values, schemas = json.loads(text)
    schemas["$defs"] = {renames.get(k, k): v for k, v in schemas.get("$defs", {}).items()}
    return dict(zip(refs, (ref_values[str(i)] for i in range(len(refs))), strict=True)), schemas


# Descriptions of path and query parameters, by name.
_PARAMS = {
    "id": "A session's name or UUID (Backend.AI), a job session's id, a kernel's id, or a "
          "folder's name",
    "name": "A kernelspec's or folder's name",
    "language": "A language name or alias",
    "job_id": "A job's id",
    "execution_id": "An execution's id",
    "session_id": "The session_id given to executions",
    "path": "A directory under /home/work",
    "file": "A file under /home/work",
    "files": "Paths under /home/work (repeatable, at most 5)",
    "limit": "Entries per page of a listing, in name order (at most 1000)",
    "after": "Page on: the last filename of the previous page",
    "size": "Items per page (0: all)",
    "index": "Zero-based page",
    "progress": "1: stream NDJSON progress lines, then the result",
}

def _websocket(summary: str, tag: str, description: str, id_description: str,
               **x_websocket: Any) -> dict[str, Any]:
    """A WebSocket route's entry: its ``{id}`` path parameter, the 101 answer, and what goes
    over it (``x-websocket``)."""
    return {"summary": f"WebSocket: {summary}", "tags": [tag], "description": description,
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}, "description": id_description}],
            "responses": {"101": {"description": "Switching Protocols: the WebSocket is open"}},
            "x-websocket": x_websocket}


# WebSocket routes: not JSON operations, but a client reading this document should find them.
WEBSOCKETS: dict[str, dict[str, Any]] = {
    "/api/kernels/{id}/channels": _websocket(
        "a kernel's Jupyter channels", "jupyter",
        "Jupyter messages over a WebSocket, as jupyter_server serves them: legacy JSON frames, "
        "or the v1.kernel.websocket.jupyter.org subprotocol. Browsers authenticate with "
        "?token=<secret key>.", "A kernel's id",
        subprotocols=["v1.kernel.websocket.jupyter.org"],
        frames="Jupyter messages (JSON, or the v1 binary framing)"),
    "/stream/session/{id}/execute": _websocket(
        "streaming execute (Backend.AI)", "backendai",
        "Send {mode, code, runId, options} frames; receive the run's results as they come, as "
        "the execute route's `result` objects. Also at /stream/kernel/{id}/execute.",
        _PARAMS["id"], frames="JSON: requests as BackendAI Execute, answers as results"),
}


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


_ERRORS = {400: "Bad request", 401: "Missing or invalid credentials", 403: "Forbidden",
           404: "Not found", 406: "Limits above the server's hard limits",
           409: "Conflicts with the current state", 412: "Quota exceeded",
           422: "Malformed body", 429: "Rate limit exceeded",
           507: "No space left (the server's disk is low, or a quota'd dir is full)"}
