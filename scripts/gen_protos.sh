#!/usr/bin/env bash
# Rebuild the committed Python stubs (raymoe/v1/*_pb2*.py, .pyi) from protos/raymoe/v1/*.proto.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root; tests pass a temp
# directory and compare). Needs grpcio-tools (the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out/raymoe/v1"
"$py" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" protos/raymoe/v1/*.proto
