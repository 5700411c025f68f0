#!/usr/bin/env bash
# Every dialect of kernel-bridge with curl. Needs KB_URL and KB_API_KEY (see README.md) and jq.
set -euo pipefail
: "${KB_URL:=http://127.0.0.1:8002}" "${KB_API_KEY:?export KB_API_KEY=<secret_key>}"
H=(-sS -H "X-API-Key: $KB_API_KEY" -H "Content-Type: application/json")

echo "== Backend.AI kernel API"
curl "${H[@]}" -X POST "$KB_URL/session" -d '{"lang": "python3", "name": "demo-curl"}'; echo
curl "${H[@]}" -X POST "$KB_URL/session/demo-curl" \
     -d '{"mode": "query", "code": "print(6 * 7)", "runId": null}'; echo
curl "${H[@]}" -X DELETE "$KB_URL/session/demo-curl"; echo

echo "== Sandbox execute API"
curl "${H[@]}" -X POST "$KB_URL/api/v1/execute" \
     -d '{"language": "python", "code": "print(input())", "stdin": "hello"}'; echo
curl "${H[@]}" "$KB_URL/api/v1/execute/languages"; echo

echo "== Job sessions"
sid=$(curl "${H[@]}" -X POST "$KB_URL/api/v1/sessions" \
      -d '{"mode": "dedicated", "max_ttl": 600, "interactive_ttl": 60}' | jq -r .id)
job=$(curl "${H[@]}" -X POST "$KB_URL/api/v1/sessions/$sid/jobs" \
      -d '{"code": "print(sum(range(10)))"}' | jq -r .id)
sleep 2
curl "${H[@]}" "$KB_URL/api/v1/jobs/$job"; echo
curl "${H[@]}" -X DELETE "$KB_URL/api/v1/sessions/$sid/close"; echo

echo "== Jupyter kernels (Authorization: token, as jupyter_server's GatewayClient sends it)"
J=(-sS -H "Authorization: token $KB_API_KEY" -H "Content-Type: application/json")
curl "${J[@]}" "$KB_URL/api/kernelspecs" | jq '.default, (.kernelspecs | keys)'
kid=$(curl "${J[@]}" -X POST "$KB_URL/api/kernels" -d '{"name": "kb-python"}' | jq -r .id)
curl "${J[@]}" "$KB_URL/api/kernels/$kid"; echo
curl "${J[@]}" -X POST "$KB_URL/api/kernels/$kid/interrupt" -o /dev/null -w '%{http_code}\n'
curl "${J[@]}" -X DELETE "$KB_URL/api/kernels/$kid" -o /dev/null -w '%{http_code}\n'
# Code runs over the WebSocket /api/kernels/{id}/channels: see jupyter_requests.py.

echo "== Notebooks"
jq -n --slurpfile nb "$(dirname "$0")/report.ipynb" '{notebook: $nb[0], parameters: {day: 3}}' \
  | curl "${H[@]}" -X POST "$KB_URL/api/v1/notebooks/execute" -d @- \
  | jq '.status, [.notebook.cells[].outputs[]?.text // empty]'
