#!/usr/bin/env bash
# Creates .venv and installs raymix with its pinned dependencies (and the dev
# tools). Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip only when something is missing or off its pin: a second run (the README's
# quickstart line) changes nothing, and needs neither the network nor a rebuild.
if ! .venv/bin/python - <<'PY' 2>/dev/null
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
assert version("raymix") == project["version"]
for req in map(Requirement, project["dependencies"] + project["optional-dependencies"]["dev"]):
    assert req.specifier.contains(version(req.name), prereleases=True), req
PY
then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location .* is ignored" || true
fi
.venv/bin/python -c "import raymix, ray, torch, mlflow, transformers" 
