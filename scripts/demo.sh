#!/usr/bin/env bash
# Set up (if needed) and run the raymoe demo on the embedded default: local Ray, no services.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/raymoe demo "$@"
