#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install universal-neurons into it.
# On a machine without an NVIDIA GPU, torch's CPU wheel is installed first, so pip never
# pulls the multi-GB CUDA build; with a GPU, pip's default (CUDA) torch is used.
#   UN_VENV=path          use another environment directory
#   UN_EXTRAS=test        install the test extras too
#   UN_TORCH_INDEX=URL    an extra package index that serves torch's CPU wheels (PyTorch publishes one);
#                         without it, pip's own configuration (pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS) decides
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UN_VENV:-.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    pip_q torch
  else
    echo "setup: no GPU, installing torch's CPU wheel"
    # a CPU wheel already on this machine (pip's find-links) first; else from UN_TORCH_INDEX; else pip's own indexes
    if ! pip_q --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
      if [ -n "${UN_TORCH_INDEX:-}" ]; then
        pip_q "torch>=2.2" --extra-index-url "$UN_TORCH_INDEX"
      else
        echo "setup: no local CPU wheel and UN_TORCH_INDEX unset: pip's configured index decides which torch build" \
             "you get (on PyPI the default Linux build includes CUDA); set UN_TORCH_INDEX to PyTorch's CPU index to avoid it"
        pip_q "torch>=2.2"
      fi
    fi
  fi
fi
EXTRAS="${UN_EXTRAS:-}"
if [ -n "$EXTRAS" ]; then pip_q -e ".[$EXTRAS]"; else pip_q -e .; fi
echo "setup: ready ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
