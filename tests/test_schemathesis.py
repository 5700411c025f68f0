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

from api import openapi
from api.app import operations

from .support import Server, run_server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))  # more for a long local hunt
seen: Counter[str] = Counter()
statuses: Counter[int] = Counter()


@pytest.fixture(scope="module")
def live() -> Iterator[Server]:
    started = time.monotonic()
    with run_server(pool_python="1") as s:
        yield s
    print(f"\nFIGURE schemathesis: {sum(seen.values())} cases over {len(seen)} operations in "
          f"{time.monotonic() - started:.0f} s; fewest per operation: "
          f"{min(seen.values()) if seen else 0}; statuses {sorted(statuses.items())}")


# The document the server serves, built by the same code; test_served_document_is_the_one
# checks that the live server's /api/openapi.json is exactly this. (schemathesis' lazy
# from_fixture loader does not run under pytest 9.)
schema = schemathesis.openapi.from_dict(openapi.document(operations()))


def test_served_document_is_the_one(live: Server) -> None:
    served = requests.get(live.url + "/api/openapi.json", timeout=30).json()
    assert served == openapi.document(operations())
    assert sum(len(methods) for methods in served["paths"].values()) >= 50


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          print_blob=True)
def test_no_server_errors(case: Any, live: Server) -> None:
    seen[case.operation.label] += 1
    response = case.call(base_url=live.url, headers={"X-API-Key": live.secret_key},
                         timeout=120)
    statuses[response.status_code] += 1
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} → {response.status_code}: "
        f"{response.text[:500]}\n{case.as_curl_command()}")
