"""Jupyter kernels: start one over REST (requests), run code over the kernel WebSocket
(websocket-client), answer an input request, shut it down.
Usage: KB_URL=… KB_API_KEY=… python examples/jupyter_requests.py"""

import json
import os
import uuid

import requests
import websocket

URL = os.environ.get("KB_URL", "http://127.0.0.1:8002")
AUTH = {"Authorization": f"token {os.environ['KB_API_KEY']}"}  # as jupyter_server sends it

specs = requests.get(f"{URL}/api/kernelspecs", headers=AUTH, timeout=60).json()
print("kernelspecs:", sorted(specs["kernelspecs"]), "default:", specs["default"])
kernel = requests.post(f"{URL}/api/kernels", json={"name": "kb-python"}, headers=AUTH,
                       timeout=60).json()
print("kernel:", kernel)

ws = websocket.create_connection(URL.replace("http", "ws", 1)
                                 + f"/api/kernels/{kernel['id']}/channels",
                                 header=[f"{k}: {v}" for k, v in AUTH.items()])


def message(msg_type: str, content: dict, parent: dict | None = None) -> dict:
    return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": "example",
                       "username": "example", "version": "5.3"},
            "parent_header": parent or {}, "metadata": {}, "content": content}


request = message("execute_request", {"code": "n = input('number? ')\nprint(int(n) ** 2)",
                                      "silent": False, "allow_stdin": True})
ws.send(json.dumps({**request, "channel": "shell"}))
while True:
    msg = json.loads(ws.recv())
    if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
        continue
    if msg["msg_type"] == "input_request":
        print(msg["content"]["prompt"], "12")
        reply = message("input_reply", {"value": "12"}, parent=msg["header"])
        ws.send(json.dumps({**reply, "channel": "stdin"}))
    elif msg["msg_type"] == "stream":
        print("stdout:", msg["content"]["text"], end="")
    elif msg["msg_type"] == "execute_reply":
        print("reply:", msg["content"]["status"])
        break
ws.close()
print(requests.delete(f"{URL}/api/kernels/{kernel['id']}", headers=AUTH, timeout=60).status_code)
