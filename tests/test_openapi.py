"""The OpenAPI document is served and describes the JSON routes from the pydantic models."""

from __future__ import annotations

import requests

from .support import Server


def test_openapi_document(server: Server) -> None:
    r = requests.get(server.url + "/api/openapi.json", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    create = doc["paths"]["/session"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert {"lang", "image", "clientSessionToken", "limits"} <= set(schema["properties"])
    execute = doc["paths"]["/session/{id}"]["post"]
    assert "200" in execute["responses"] and "404" in execute["responses"]
    # every dialect's JSON routes are described
    for path in ("/api/v1/execute", "/api/v1/execute/batch", "/api/v1/sessions/{id}/jobs",
                 "/api/kernels", "/api/v1/notebooks/execute", "/folders", "/session/{id}/files"):
        assert path in doc["paths"], path
    # every $ref resolves
    text = r.text
    for name in doc["components"]["schemas"]:
        assert f'"#/components/schemas/{name}"' in text or name in text
