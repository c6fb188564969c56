#!/usr/bin/env bash
# Checks the HTTP API against its own OpenAPI document with schemathesis: starts the server on the BERT test
# fixture, lets schemathesis generate valid and invalid requests for every operation of /openapi.json (at least
# MIN_CASES in all), and fails on any 5xx, any answer the document does not describe (status, content type,
# headers, body), valid data refused or invalid data accepted. No example database is kept, so a run here
# generates what a run on a clean clone does. Config and hooks: scripts/checks/schemathesis/.
# usage: scripts/checks/openapi-check.sh [SERVER_BINARY]   (default target/debug/rerank-server, built if missing)
# env:   SCHEMATHESIS_VENV  (default .ci-cache/schemathesis-venv; PyPI on the first run only)
#        MAX_EXAMPLES (default 300 per operation and phase), MIN_CASES (default 1000), SEED (default 1)
set -euo pipefail
cd "$(dirname "$0")/../.."

SERVER=${1:-target/debug/rerank-server}
[ -x "$SERVER" ] || cargo build --locked --bin rerank-server
VENV=${SCHEMATHESIS_VENV:-.ci-cache/schemathesis-venv}
MAX_EXAMPLES=${MAX_EXAMPLES:-300}
MIN_CASES=${MIN_CASES:-1000}
SEED=${SEED:-1}
# Exact versions, dependencies included.
REQUIREMENTS='schemathesis==4.32.5
anyio==4.16.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
graphql-core==3.3.2
harfile==0.6.0
hypothesis==6.170.17
hypothesis-graphql==0.13.5
idna==3.20
iniconfig==2.3.1
jsonschema_rs==0.60.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
packaging==26.4
pluggy==1.7.0
Pygments==2.21.0
pyrate-limiter==4.6.0
pytest==9.2.0
PyYAML==6.0.4
requests==2.34.2
rich==15.0.0
sortedcontainers==2.4.0
typing_extensions==4.16.0
urllib3==2.8.0
Werkzeug==3.1.9'
if [ ! -x "$VENV/bin/st" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "== installing schemathesis into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  printf '%s\n' "$REQUIREMENTS" > "$VENV/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet -r "$VENV/requirements.txt"
  printf '%s' "$REQUIREMENTS" > "$VENV/.requirements"
fi

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REPORTS=$(mktemp -d)
RERANK_DRAIN_DELAY=0s RUST_LOG=warn "$SERVER" --model-id tests/fixtures/bert-tiny-1label --host 127.0.0.1 \
  --port "$PORT" > "$REPORTS/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  if python3 -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$REPORTS/server.log"; exit 1; }
  sleep 0.1
done

echo "== schemathesis against http://127.0.0.1:$PORT/openapi.json"
status=0
(cd scripts/checks/schemathesis && "../../../$VENV/bin/st" run "http://127.0.0.1:$PORT/openapi.json" --checks all \
  --max-examples "$MAX_EXAMPLES" --seed "$SEED" --generation-database none --continue-on-failure --report json \
  --report-dir "$REPORTS" --no-color) || status=$?
python3 - "$REPORTS" "$MIN_CASES" "$status" <<'PY'
import glob, json, sys
reports, minimum, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = json.load(open(sorted(glob.glob(f"{reports}/json-*.json"))[-1]))
cases = report["test_cases"]
print(f"openapi check: {cases['generated']} cases, {cases['with_failures']} with failures, "
      f"{cases['errored']} errored, schemathesis exit {status}")
if status != 0 or cases["with_failures"] or cases["errored"] or cases["generated"] < minimum:
    sys.exit(f"openapi check: FAILED (need >= {minimum} cases, no failures)")
PY
