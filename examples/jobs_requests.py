"""Job sessions with requests: a dedicated session, two jobs sharing state, close.
Usage: KB_URL=… KB_API_KEY=… python examples/jobs_requests.py"""

import os
import time

import requests

URL = os.environ.get("KB_URL", "http://127.0.0.1:8002") + "/api/v1"
api = requests.Session()
api.headers["X-API-Key"] = os.environ["KB_API_KEY"]

session = api.post(f"{URL}/sessions", json={"mode": "dedicated", "max_ttl": 600,
                                             "interactive_ttl": 60}, timeout=60).json()
jobs = [api.post(f"{URL}/sessions/{session['id']}/jobs", json={"code": code}, timeout=60).json()
        for code in ("x = 6", "print(x * 7)")]
for job in jobs:
    while (state := api.get(f"{URL}/jobs/{job['id']}", timeout=60).json())["status"] \
            in ("queued", "running"):
        time.sleep(0.3)
    print(state["status"], repr(state.get("stdout")))
api.delete(f"{URL}/sessions/{session['id']}/close", timeout=60)
print(api.get(f"{URL}/sessions/{session['id']}", timeout=60).json()["state"])
