"""Sandbox execute API with requests: a one-shot run, a stateful session, an async run.
Usage: KB_URL=… KB_API_KEY=… python examples/sandbox_requests.py"""

import os
import time

import requests

URL = os.environ.get("KB_URL", "http://127.0.0.1:8002") + "/api/v1/execute"
api = requests.Session()
api.headers["X-API-Key"] = os.environ["KB_API_KEY"]

one = api.post(URL, json={"language": "python", "code": "print(input()[::-1])",
                          "stdin": "stressed"}, timeout=60).json()
print(one["stdout"], one["exit_code"])

for code in ("total = 40", "print(total + 2)"):  # state kept within session_id
    r = api.post(URL, json={"language": "python", "code": code, "session_id": "demo"}, timeout=60)
    print(r.json()["stdout"], end="")
api.delete(f"{URL}/session/demo", timeout=60)

ex = api.post(f"{URL}/async", json={"language": "bash", "code": "sleep 1; echo done"},
              timeout=60).json()
while (status := api.get(f"{URL}/status/{ex['execution_id']}", timeout=60).json())["status"] \
        in ("pending", "running"):
    time.sleep(0.5)
print(status["status"], status["result"]["stdout"])
