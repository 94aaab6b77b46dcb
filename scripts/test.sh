#!/usr/bin/env bash
# Install universal-neurons with its test extras into .venv, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
UN_EXTRAS=test bash scripts/setup.sh
bash scripts/install_browser.sh  # Debian's Chromium for the report's browser test (no-op when present)
exec .venv/bin/python -m pytest "$@"
