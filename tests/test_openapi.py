"""The OpenAPI document is served, describes every JSON route from the pydantic models with a
description and an example on every field, and is browsable at /api/docs without the network."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .support import Server


@pytest.fixture(scope="module")
def doc(server: Server) -> dict[str, Any]:
    r = requests.get(server.url + "/api/openapi.json", timeout=10)
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def is_reference(prop: dict[str, Any]) -> bool:
    """A property that is another schema (or a list or optional of one): described there."""
    if "$ref" in prop:
        return True
    if prop.get("type") == "array" and "$ref" in prop.get("items", {}):
        return True
    return any(is_reference(p) for p in prop.get("anyOf", []) if p.get("type") != "null")


def test_openapi_document(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.")
    create = doc["paths"]["/session"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert {"lang", "image", "clientSessionToken", "limits"} <= set(schema["properties"])
    execute = doc["paths"]["/session/{id}"]["post"]
    assert "200" in execute["responses"] and "404" in execute["responses"]
    # every dialect's JSON routes are described
    for path in ("/api/v1/execute", "/api/v1/execute/batch", "/api/v1/sessions/{id}/jobs",
                 "/api/kernels", "/api/v1/notebooks/execute", "/folders", "/session/{id}/files",
                 "/api/v1/execute/languages"):
        assert path in doc["paths"], path


def resolves(doc: dict[str, Any], ref: str) -> bool:
    """Whether ``ref`` (a local JSON pointer, ``#/a/b``) names something in ``doc``."""
    if not ref.startswith("#/"):
        return False  # an outside document: nothing a client of this one can follow
    node: Any = doc
    for part in ref[2:].split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return isinstance(node, dict)


def unresolved(doc: dict[str, Any]) -> list[str]:
    return [ref for ref in refs(doc) if not resolves(doc, ref)]


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    assert len(list(refs(doc))) > 50
    assert unresolved(doc) == []


def test_a_broken_ref_is_found(doc: dict[str, Any]) -> None:
    """The check above can fail: break the document once, two ways, and it says where."""
    broken = copy.deepcopy(doc)
    body = broken["paths"]["/session"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"]["$ref"] = "#/components/schemas/NoSuchModel"
    assert unresolved(broken) == ["#/components/schemas/NoSuchModel"]
    target = doc["paths"]["/api/v1/execute"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["$ref"]
    del broken["components"]["schemas"][target.rsplit("/", 1)[-1]]  # a schema that is used
    assert target in unresolved(broken)
    assert unresolved(doc) == []  # the served one untouched


def test_schema_names_are_clean(doc: dict[str, Any]) -> None:
    names = set(doc["components"]["schemas"])
    assert not [n for n in names if "__" in n or "." in n], sorted(names)
    assert {"BackendAIExecuteResponse", "SandboxExecuteResponse", "BackendAICreateSession",
            "JobsCreateSession"} <= names


def test_every_field_has_a_description_and_an_example(doc: dict[str, Any]) -> None:
    missing = []
    for name, schema in doc["components"]["schemas"].items():
        for prop, spec in (schema.get("properties") or {}).items():
            if not spec.get("description"):
                missing.append(f"{name}.{prop}: description")
            if not is_reference(spec) and not spec.get("examples"):
                missing.append(f"{name}.{prop}: examples")
    assert not missing, missing
    result = doc["components"]["schemas"]["SandboxExecuteResponse"]["properties"]
    assert "truncated" in result and "output limit" in result["truncated"]["description"]


def test_every_parameter_is_described(doc: dict[str, Any]) -> None:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op.get("summary"), (method, path)
            for param in op.get("parameters", []):
                assert param.get("description") and param["description"] != param["name"], (
                    method, path, param)


def test_websocket_routes_are_listed(doc: dict[str, Any]) -> None:
    channels = doc["paths"]["/api/kernels/{id}/channels"]["get"]
    assert "101" in channels["responses"]
    assert "v1.kernel.websocket.jupyter.org" in channels["x-websocket"]["subprotocols"]
    assert "x-websocket" in doc["paths"]["/stream/session/{id}/execute"]["get"]


def test_docs_page_is_served_from_the_package(server: Server) -> None:
    r = requests.get(server.url + "/api/docs", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "/api/openapi.json" in r.text and "http" not in r.text  # no CDN: the network is closed
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")):
        a = requests.get(f"{server.url}/api/docs/{asset}", timeout=10)
        assert a.status_code == 200 and kind in a.headers["Content-Type"], asset
        assert len(a.content) > 10_000
    assert "SwaggerUIBundle" in requests.get(server.url + "/api/docs/swagger-ui-bundle.js",
                                             timeout=10).text
