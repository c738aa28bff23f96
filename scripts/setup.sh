#!/usr/bin/env bash
# Installs raymoe and its dev tools into ./.venv (idempotent; fast when already installed).
# RAYMOE_TORCH_SPEC overrides the torch requirement (default: the CPU build, torch==2.13.0);
# e.g. RAYMOE_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# redis-server (Debian's package): the tests of the Redis metadata store run a real one
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      --no-install-recommends redis-server) >/dev/null
  else
    echo "note: redis-server is missing (apt-get install redis-server); its tests will fail" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# shellcheck disable=SC2086
$PIP install ${RAYMOE_TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v "is ignored: it is neither" || true
$PIP install -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import raymoe, torch, ray; print(f'raymoe {raymoe.__version__} (torch {torch.__version__}, ray {ray.__version__}) ready in .venv')"
