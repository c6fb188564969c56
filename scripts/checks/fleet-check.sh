#!/usr/bin/env bash
# Fleet check: three rerank-server replicas, each in its own network namespace, behind HAProxy
# (deploy/haproxy/haproxy.cfg), under steady load; rolling restart, kill -9, a partition, overload across the
# fleet and a grpcio client balancing over DNS while a replica is added (scripts/checks/fleet_scenarios.py says what each
# checks). Needs root (ip netns). Installs HAProxy and dnsmasq from Debian's packages when missing, builds the
# server and the load client, and puts grpcio into a venv for the client-side balancing client.
# usage: sudo scripts/checks/fleet-check.sh [fleet_scenarios.py options, e.g. --scenarios rolling_restart]
# env:   PROFILE      cargo profile of the binaries (default debug, what `cargo test` builds; release for the
#                     longer runs in the README)
#        FLEET_VENV   the Python client's venv (default .ci-cache/fleet-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "fleet check: needs root for network namespaces" >&2
  exit 1
fi
if ! command -v haproxy >/dev/null || ! command -v dnsmasq >/dev/null; then
  echo "== installing haproxy and dnsmasq"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy dnsmasq-base >/dev/null
fi
echo "== $(haproxy -v | head -n 1)"

PROFILE=${PROFILE:-debug}
if [ "$PROFILE" = debug ]; then
  cargo build --locked --bin rerank-server --bin fleetload
else
  cargo build --locked --profile "$PROFILE" --bin rerank-server --bin fleetload
fi
BIN=target/$PROFILE

VENV=${FLEET_VENV:-.ci-cache/fleet-venv}
REQUIREMENTS='grpcio==1.85.3
grpcio-tools==1.85.1
protobuf==7.36.2'
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "== installing grpcio into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  printf '%s\n' "$REQUIREMENTS" > "$VENV/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet -r "$VENV/requirements.txt"
  printf '%s' "$REQUIREMENTS" > "$VENV/.requirements"
fi
STUBS=$VENV/stubs
mkdir -p "$STUBS"
"$VENV/bin/python" -m grpc_tools.protoc -Iproto --python_out="$STUBS" --grpc_python_out="$STUBS" \
  proto/rerank/v1/rerank.proto

exec python3 scripts/checks/fleet_scenarios.py --server "$BIN/rerank-server" --fleetload "$BIN/fleetload" \
  --python "$VENV/bin/python" --stubs "$STUBS" "$@"
