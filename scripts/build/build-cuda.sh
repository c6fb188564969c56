#!/usr/bin/env bash
# Builds the CUDA release binaries (rerank-server, gpu-check, loadgen) for compute capability
# $CUDA_COMPUTE_CAP (default 90: H100/H200; 80 for A100, 89 for L4/L40S).
#
# With a CUDA toolkit installed (nvcc on PATH, CUDA 12.x or 13.0): just run this script.
# Without one, on a machine with no GPU: set CUDA_TOOLCHAIN=/path/to/toolchain.sh, a script that installs a
# CUDA 13.0 toolchain from PyPI wheels with a libcuda link stub and exports CUDA_ROOT/PATH; it is sourced first.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
if [ -n "${CUDA_TOOLCHAIN:-}" ]; then
  cargo fetch >/dev/null  # the libcuda stub is generated from cudarc's sources
  # shellcheck disable=SC1090
  source "$CUDA_TOOLCHAIN"
fi
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit or set CUDA_TOOLCHAIN" >&2; exit 1; }
echo "building for compute capability $CUDA_COMPUTE_CAP with $(nvcc --version | grep release)"
cargo build --release --features cuda --bins
out=${CARGO_TARGET_DIR:-target}/release
ls -la "$out/rerank-server" "$out/gpu-check" "$out/loadgen"
