#!/usr/bin/env bash
# Creates .venv and installs raymix with its pinned dependencies (and the dev
# tools). Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v "^WARNING: Location .* is ignored" || true
.venv/bin/python -c "import raymix, ray, torch, mlflow, transformers" 
