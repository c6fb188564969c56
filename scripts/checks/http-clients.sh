#!/usr/bin/env bash
# Calls a running rerank-server's HTTP endpoints through the real client libraries (Cohere SDK v2 and v1,
# LangChain's CohereRerank, LlamaIndex's Text Embeddings Inference reranker) and checks that they agree.
#   scripts/checks/http-clients.sh [URL]     (URL defaults to http://127.0.0.1:50051; VENV=.venv-clients)
#   RERANK_API_KEY=secret RERANK_MODEL=name scripts/checks/http-clients.sh http://127.0.0.1:50051
# Needs Python 3.11+ with pip (langchain-core 1.x requires it) and access to PyPI the first time.
# Exits non-zero when a client fails or the clients disagree on order or scores.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-clients}
URL=${1:-http://127.0.0.1:50051}
# The versions these endpoints were checked against; the two cores are pinned so the set stays reproducible.
PACKAGES=(cohere==5.21.1 langchain-cohere==0.6.0 langchain-core==1.8.3
  llama-index-postprocessor-tei-rerank==0.6.0 llama-index-core==0.14.25)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/pip" freeze 2>/dev/null | grep -qx "cohere==5.21.1"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${PACKAGES[@]}"
fi
exec "$VENV/bin/python" scripts/checks/http_client_matrix.py "$URL"
