#!/usr/bin/env bash
# Runs each scenario of scripts/bench/hostile_scenarios.py against a freshly started release server (clean memory
# peaks), with the real-size model where the scenario is about speed and the tiny fixture where it is about a
# stream's length. usage: scripts/bench/hostile-checks.sh [MINILM_DIR] [BIN_DIR]   (needs grpcio, grpcio-reflection)
set -euo pipefail
cd "$(dirname "$0")/../.."
MINILM=${1:-models/minilm-reranker}
BIN=${2:-target/release}
TINY=tests/fixtures/bert-tiny-1label
PY=${PYTHON:-python3}
PORT=${PORT:-50072}

# run MODEL SCENARIO [ARGS...]: one server, one scenario.
run() {
  local model=$1 scenario=$2
  shift 2
  RERANK_MAX_DOCUMENTS=5000 RERANK_MAX_MESSAGE_BYTES=134217728 RERANK_STREAM_IDLE_TIMEOUT=3s \
    "$BIN/rerank-server" --model-id "$model" --host 127.0.0.1 --port "$PORT" > /tmp/hostile-server.log 2>&1 &
  local server=$!
  until grep -q "model loaded and warmed up" /tmp/hostile-server.log; do sleep 0.2; done
  "$PY" scripts/bench/hostile_scenarios.py --addr "127.0.0.1:$PORT" --pid "$server" --only "$scenario" "$@" || true
  kill "$server"
  wait "$server" 2>/dev/null || true
}

run "$MINILM" long_query --long-docs 8
# 1,000 such documents: with a deadline the real-size model refuses at once (it needs minutes of CPU); the tiny
# model runs the whole request, so its peak shows tokenization's memory.
run "$MINILM" long_query --long-docs 1000 --timeout 60
run "$TINY" long_query --long-docs 1000
run "$TINY" return_documents_stream --stream-docs 5000
run "$TINY" return_documents_stream --stream-docs 20000
run "$MINILM" cancelled_tokenization
run "$MINILM" cancelled_large
run "$MINILM" deadline_large
# A reader stalls for good only once the scores it does not read fill its flow-control window: quickly with
# the tiny model, after minutes with the real-size one on a CPU.
run "$TINY" stalled_reader --stall-seconds 8 --stall-chunks 100
