#!/usr/bin/env bash
# Install universal-neurons into .venv, then run the whole pipeline on the built-in demo family.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/universal-neurons demo "$@"
