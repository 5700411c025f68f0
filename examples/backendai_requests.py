"""Backend.AI kernel API with requests: create a session, run queries (one asks for input),
destroy. Usage: KB_URL=… KB_API_KEY=… python examples/backendai_requests.py"""

import os

import requests

URL = os.environ.get("KB_URL", "http://127.0.0.1:8002")
api = requests.Session()
api.headers["X-API-Key"] = os.environ["KB_API_KEY"]


def execute(session: str, body: dict) -> dict:
    r = api.post(f"{URL}/session/{session}", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["result"]


r = api.post(f"{URL}/session", json={"lang": "python3", "name": "demo-requests"}, timeout=60)
print(r.status_code, r.json())
result = execute("demo-requests", {"mode": "query", "code": "name = input('who? ')\nprint('hi', name)",
                                   "runId": None})
while result["status"] != "finished":
    if result["status"] == "waiting-input":
        result = execute("demo-requests", {"mode": "input", "code": "ada", "runId": result["runId"]})
    else:
        result = execute("demo-requests", {"mode": "continue", "code": "", "runId": result["runId"]})
print(result["console"])
print(api.delete(f"{URL}/session/demo-requests", timeout=60).json())
