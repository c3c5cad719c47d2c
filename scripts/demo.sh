#!/usr/bin/env bash
# README command 1: set up .venv/ (idempotent) and run the demo on the embedded default models.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/esg-memory demo "$@"
