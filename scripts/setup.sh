#!/usr/bin/env bash
# Creates .venv with kvlab and its test tools. On a machine without CUDA the CPU build of
# PyTorch goes in first, so that no CUDA packages are pulled. Idempotent: a no-op when done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.kvlab-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    # the CPU wheel; set TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu where no local wheel exists
    pip install -q "torch==2.13.0" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple}
  fi
fi
pip install -q -e ".[dev]"
touch "$stamp"
