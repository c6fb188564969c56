#!/usr/bin/env bash
# Peak resident memory of the server across one RerankStream of N documents (return_documents off), for the
# bounded-memory check: run with 10000 and 100000 and compare.
# usage: scripts/bench/stream-memory.sh N [MODEL_DIR] [BIN_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:?documents}
MODEL=${2:-tests/fixtures/bert-tiny-1label}
BIN=${3:-target/release}
PORT=${PORT:-50070}
"$BIN/rerank-server" --model-id "$MODEL" --host 127.0.0.1 --port "$PORT" > /tmp/stream-memory-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
until grep -q "model loaded and warmed up" /tmp/stream-memory-server.log; do sleep 0.2; done
"$BIN/loadgen" --addr "http://127.0.0.1:$PORT" --stream-documents "$N" --chunk 1000 --doc-words 150..250 --timeout 1h
echo "server peak RSS (VmHWM): $(grep VmHWM /proc/$SERVER/status | awk '{print $2, $3}')"
