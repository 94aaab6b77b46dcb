#!/usr/bin/env bash
# Install universal-neurons with its test extras into .venv, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
UN_EXTRAS=test bash scripts/setup.sh
bash scripts/install_browser.sh  # Debian's Chromium for the report's browser test (no-op when present)
# GPT-2's BPE ranks (whisper/assets/gpt2.tiktoken, MIT) for the tests' real GPT-2 tokenizer, offline.
# --no-deps: the package is only a carrier for that file (never imported); its own dependencies are heavy.
VENV="${UN_VENV:-.venv}"
if ! "$VENV/bin/python" -c 'import importlib.util as u, os, sys; s = u.find_spec("whisper");
sys.exit(not (s and any(os.path.isfile(os.path.join(p, "assets", "gpt2.tiktoken")) for p in s.submodule_search_locations)))'
then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "openai-whisper==20250625"
fi
exec "$VENV/bin/python" -m pytest "$@"
