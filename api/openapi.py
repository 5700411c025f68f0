"""The OpenAPI document at ``GET /api/openapi.json``, generated from each dialect's pydantic
models. Every dialect lists its JSON operations once, as :class:`Operation`s."""

from __future__ import annotations

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
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {"summary": op.summary, "tags": [op.tag], "responses": {}}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in _path_params(op.path)]
        params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                   for q in op.query]
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
    return {
        "openapi": "3.1.0",
        "info": {"title": "kernel-bridge", "version": __version__,
                 "description": "Backend.AI kernel API, Sandbox execute API, job sessions and "
                                "Jupyter kernels over sandboxed Jupyter kernels."},
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


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


_ERRORS = {400: "Bad request", 401: "Missing or invalid credentials", 403: "Forbidden",
           404: "Not found", 406: "Limits above the server's hard limits",
           409: "Conflicts with the current state", 412: "Quota exceeded",
           422: "Malformed body", 429: "Rate limit exceeded",
           507: "No space left (the server's disk is low, or a quota'd dir is full)"}
