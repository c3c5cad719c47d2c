#!/usr/bin/env bash
# Create .venv/ in the repo root (once) and install esg-memory with its extras into it.
# Idempotent: a second run reuses .venv/ and skips pip when pyproject.toml and constraints.txt have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv/ with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.esg-memory-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import esg_memory, index" 2>/dev/null; then
  echo "setup: installing esg-memory[all] into .venv/ (first time: a few minutes, torch is large)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt: the exact versions CI tests with (floors in pyproject.toml are those versions)
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[all]"
  echo "$want" > "$stamp"
fi
