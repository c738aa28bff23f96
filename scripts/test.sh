#!/usr/bin/env bash
# Set up (if needed), check lint, and run the whole test suite (unit + integration; GPU tests
# skip themselves without a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
