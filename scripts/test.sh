#!/usr/bin/env bash
# Install universal-neurons with its test extras into .venv, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
UN_EXTRAS=test bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
