#!/usr/bin/env bash
# One-call check of the CUDA build on a GPU machine; prints a summary table last.
#   1. each CUDA kernel against candle's reference op (gpu-check kernels);
#   2. score parity of the server on the GPU (fp16) against sentence-transformers fp32: seeded MiniLM-L6 and
#      XLM-R-base shaped models built here (scripts/checks/gpu_reference.py; unit-scale logits, 2e-3 absolute), and
#      the committed tiny fixtures of every architecture (hidden size 32, logits up to 5: 5e-3 of their largest
#      logit);
#   3. throughput and latency of the server through gRPC (loadgen), and torch fp16 model-only on the same
#      shapes and card for the ratio. loadgen builds texts from one-token words of the model's tokenizer, so
#      "mixed" is 16 query tokens + 32..480 document tokens, and "fixed256" 256 tokens per pair, as in the
#      torch baseline.
# usage: scripts/checks/gpu-check.sh [BIN_DIR]   BIN_DIR holds rerank-server, gpu-check and loadgen built with
#        scripts/build/build-cuda.sh (default target/release). Needs python3 with torch, transformers and
#        sentence-transformers. Set SECONDS_PER_RUN to lengthen the load runs (default 15).
#        The last lines are one table (scripts/checks/gpu_table.py): ours through gRPC, torch fp16 model-only and
#        CrossEncoder.predict fp16 on text, ratios against the targets, padding ratio, p50/p99 of a single
#        100-document request, and parity. A dry run of the plumbing on a CPU build (kernels skipped, short runs):
#        DEVICE=cpu PAIRS=128 SECONDS_PER_RUN=3 scripts/checks/gpu-check.sh target/release
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${1:-target/release}")
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
RUN=${SECONDS_PER_RUN:-15}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-minilm xlmr-base}
export DEVICE MODELS
PYTHON=${PYTHON:-python3}
TORCH_LIBS=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
if [ -d "$TORCH_LIBS" ]; then export LD_LIBRARY_PATH="$TORCH_LIBS:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"; fi
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"
failed=0
note() { echo "$*" | tee -a "$SUMMARY"; }

serve() {  # model_dir port
  "$BIN/rerank-server" --model-id "$1" --host 127.0.0.1 --port "$2" --device "$([ "$DEVICE" = cpu ] && echo cpu || echo cuda:0)" --max-documents 1000 \
    --max-batch-tokens "${MAX_BATCH_TOKENS:-65536}" --max-batch-size 512 > "$WORK/server-$2.log" 2>&1 &
  echo $! > "$WORK/server-$2.pid"
  for _ in $(seq 1 240); do
    if grep -q "model loaded and warmed up" "$WORK/server-$2.log"; then return 0; fi
    if ! kill -0 "$(cat "$WORK/server-$2.pid")" 2>/dev/null; then break; fi
    sleep 0.5
  done
  echo "server for $1 did not become ready:"; tail -5 "$WORK/server-$2.log"; return 1
}
stop() { kill "$(cat "$WORK/server-$1.pid")" 2>/dev/null; wait "$(cat "$WORK/server-$1.pid")" 2>/dev/null; }

if [ "$DEVICE" = cpu ]; then
  note "dry run on the CPU: kernels, parity through gpu-check and the model-only bench skipped"
else
  echo "== device"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"
  note "card: $(head -1 "$WORK/gpu.txt")"

  echo "== 1. kernels"
  if "$BIN/gpu-check" kernels | tee "$WORK/kernels.txt"; then :; else failed=1; fi
  note "kernels: $(tail -1 "$WORK/kernels.txt"); worst fp16 relative error $(awk '$3=="F16"{print $6}' "$WORK/kernels.txt" | sort -g | tail -1)"
fi
gpu_check() { if [ "$DEVICE" = cpu ]; then return 0; fi; "$BIN/gpu-check" "$@"; }

echo "== 2. parity"
"$PYTHON" scripts/checks/gpu_reference.py models "$WORK/models" > "$WORK/reference.log" 2>&1 || { tail -20 "$WORK/reference.log"; failed=1; }
port=50100
# Every architecture's fixture: the encoders, and the decoder rerankers (raw score = their logit difference).
for fixture in bert-tiny-1label bert-tiny-2label xlmr-tiny-1label modernbert-tiny-cls modernbert-tiny-mean \
    gte-multilingual-tiny gte-multilingual-tiny-unpacked qwen3-reranker-tiny qwen3-reranker-tiny-seq-cls \
    mxbai-rerank-v2-tiny bge-reranker-v2-gemma-tiny; do
  port=$((port + 1))
  if serve "tests/fixtures/$fixture" $port; then
    gpu_check parity --addr "http://127.0.0.1:$port" --expected "tests/fixtures/expected/$fixture.json" \
      --tolerance 5e-3 --relative | tee -a "$SUMMARY" || failed=1
  else failed=1; fi
  stop $port
done
for model in $MODELS; do
  port=$((port + 1))
  if serve "$WORK/models/$model" $port; then
    gpu_check parity --addr "http://127.0.0.1:$port" --expected "$WORK/models/$model.expected.json" \
      --tolerance 2e-3 | tee -a "$SUMMARY" || failed=1
    echo "== 3. throughput $model"
    gpu_check bench --model "$WORK/models/$model" --rows 128 --seq 256 | tee -a "$SUMMARY"
    "$BIN/loadgen" --addr "http://127.0.0.1:$port" --tokenizer "$WORK/models/$model/tokenizer.json" --concurrency 1 --documents 100 --doc-words 32..480 \
      --query-words 16 --duration "$((RUN / 2 + 1))s" | grep -E "^(server|pairs)" | paste -sd' ' | sed "s/^/ours $model mixed 1 client: /" | tee -a "$SUMMARY"
    "$BIN/loadgen" --addr "http://127.0.0.1:$port" --tokenizer "$WORK/models/$model/tokenizer.json" --concurrency 32 --documents 100 --doc-words 32..480 \
      --query-words 16 --duration "${RUN}s" | grep -E "^(server|pairs)" | paste -sd' ' | sed "s/^/ours $model mixed 32 clients: /" | tee -a "$SUMMARY"
    if [ "$model" = minilm ]; then
      "$BIN/loadgen" --addr "http://127.0.0.1:$port" --tokenizer "$WORK/models/$model/tokenizer.json" --concurrency 64 --documents 100 --doc-words 32..480 \
        --query-words 16 --duration "${RUN}s" | grep -E "^(server|pairs)" | paste -sd' ' | sed "s/^/ours $model mixed 64 clients: /" | tee -a "$SUMMARY"
    fi
    "$BIN/loadgen" --addr "http://127.0.0.1:$port" --tokenizer "$WORK/models/$model/tokenizer.json" --concurrency 32 --documents 100 --doc-words 237 \
      --query-words 16 --duration "${RUN}s" | grep -E "^(server|pairs)" | paste -sd' ' | sed "s/^/ours $model fixed256 32 clients: /" | tee -a "$SUMMARY"
  else failed=1; fi
  stop $port
done

echo "== 3b. torch fp16 baseline"
"$PYTHON" scripts/checks/gpu_reference.py baseline "$WORK/models" 2>&1 | grep "torch fp16" | tee -a "$SUMMARY"
echo "== 3c. CrossEncoder.predict fp16 on text"
"$PYTHON" scripts/checks/gpu_reference.py crossencoder "$WORK/models" 2>&1 | grep "crossencoder" | tee -a "$SUMMARY"

echo
echo "================ summary ================"
cat "$SUMMARY"
echo
"$PYTHON" scripts/checks/gpu_table.py "$WORK" || failed=1
echo "result: $([ $failed = 0 ] && echo PASS || echo FAIL)"
exit $failed
