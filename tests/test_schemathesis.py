"""Property-based fuzzing of the live server with schemathesis: every operation of
``/api/openapi.json``, valid and invalid inputs (schemathesis' positive and negative modes), with
a real key. Whatever a client sends, the answer is never a server error.

Kernel-starting operations stay cheap without being left out: the keypair's concurrency (5)
soon answers further creates with its quota error, the execution rate limit with 429, and the
warm pool serves the executions that do run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from api import openapi
from api.app import operations

from .support import Server, run_server, run_to_end

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))  # more for a long local hunt
seen: Counter[str] = Counter()
statuses: Counter[int] = Counter()


@pytest.fixture(scope="module")
def live() -> Iterator[Server]:
    started = time.monotonic()
    with run_server(pool_python="1") as s, s.client() as c:
        r = c.post("/session", json={"lang": "python", "name": TARGETS["id"]})
        assert r.status_code == 201, r.text
        KEEP.add(r.json()["sessionId"])
        assert c.post("/folders", json={"name": TARGETS["name"]}).status_code == 201
        setup = ("import os\nos.makedirs('d/e', exist_ok=True)\nopen('d/f.txt', 'w').write('x')"
                 "\nos.symlink('/etc', 'd/link')")
        run_to_end(c, "/session", TARGETS["id"], setup)
        yield s
    print(f"\nFIGURE schemathesis: {sum(seen.values())} cases over {len(seen)} operations in "
          f"{time.monotonic() - started:.0f} s; fewest per operation: "
          f"{min(seen.values()) if seen else 0}; {statuses.pop(-1, 0)} on the real session or "
          f"folder; statuses {sorted(statuses.items())}")


# The document the server serves, built by the same code; test_served_document_is_the_one
# checks that the live server's /api/openapi.json is exactly this. (schemathesis' lazy
# from_fixture loader does not run under pytest 9.)
schema = schemathesis.openapi.from_dict(openapi.document(operations()))
# Random ids only reach 404s; the file routes also get a real session and folder (made by the
# live fixture) so their paths, limits and archives are fuzzed for real.
TARGETS = {"id": "fuzz-target", "name": "fuzzfolder"}
KEEP: set[str] = set()  # the real session's id: never closed by release_places
FILE_ROUTES = ("/files", "/download", "/download_single", "/upload")


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    op = context.operation
    if not op or not op.path.endswith(FILE_ROUTES) or not isinstance(path_parameters, dict):
        return st.just(path_parameters)
    real = {k: TARGETS.get(k, v) for k, v in path_parameters.items()}
    return st.sampled_from([path_parameters, real])


def test_served_document_is_the_one(live: Server) -> None:
    served = requests.get(live.url + "/api/openapi.json", timeout=30).json()
    assert served == openapi.document(operations())
    assert sum(len(methods) for methods in served["paths"].values()) >= 50


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          print_blob=True)
def test_no_server_errors(case: Any, live: Server) -> None:
    seen[case.operation.label] += 1
    statuses[-1] += any(t in case.formatted_path for t in TARGETS.values())  # -1: on real ones
    response = case.call(base_url=live.url, headers={"X-API-Key": live.secret_key},
                         timeout=120)
    statuses[response.status_code] += 1
    if case.method == "POST" and response.status_code < 300:
        release_places(live)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} → {response.status_code}: "
        f"{response.text[:500]}\n{case.as_curl_command()}")


def release_places(live: Server) -> None:
    """Close what a fuzzed create made, as a polite client would. Every kernel a keypair holds
    takes one of its places (admission): left open, sessions would hold them for their idle
    timeout, and every later one-shot would spend its whole timeout waiting for a place."""
    with live.client() as c:
        for k in c.get("/api/kernels").json():
            if k["id"] not in KEEP:
                c.delete(f"/api/kernels/{k['id']}")
        listing = c.get("/api/v1/sessions", params={"size": 100}).json()
        for js in listing.get("sessions", []):
            if js.get("id") not in KEEP and js.get("state") != "closed":
                c.delete(f"/api/v1/sessions/{js['id']}/close")


def test_unknown_field_names_no_header_can_carry(live: Server) -> None:
    """Found by schemathesis: an unknown field named with a control or non-Latin-1 character
    went into the Warning header as is, and tornado refused the header (500)."""
    with live.client() as c:
        r = c.get("/folders", json={"\u0100": 1, "\x1f": 2, 'a"b': 3})
        assert r.status_code == 200, r.text
        assert r.headers["Warning"] == ('299 kernel-bridge "Unknown fields ignored: \\u0100, '
                                        '\\u001f, a\\"b"')
