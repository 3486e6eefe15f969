#!/usr/bin/env bash
# Creates .venv with kvlab and the extras asked for, printing a line per phase.
#   bash scripts/setup.sh            # kvlab + dev (tests, serving): `make setup`, `make test`
#   bash scripts/setup.sh base       # kvlab alone: `make demo`
#   bash scripts/setup.sh serve      # any extras of pyproject.toml, comma-separated
# On a machine with an NVIDIA GPU the `gpu` extra (Triton, cuda-bindings) is added. Without
# CUDA the CPU build of PyTorch goes in first, so that no CUDA packages are pulled.
# Idempotent: a no-op when the extras asked for are installed and pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${1:-dev}
stamp="$VENV/.kvlab-installed"  # the extras installed, one a line

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if has_gpu; then EXTRAS="$EXTRAS,gpu"; fi
wanted=$(tr ',' '\n' <<<"$EXTRAS" | grep -v -x -e base -e '' | sort -u || true)

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ -z "$(comm -23 <(echo "$wanted") <(sort -u "$stamp"))" ]; then
  exit 0
fi

start=$SECONDS
step() { printf '[setup %3ss] %s\n' "$((SECONDS - start))" "$*"; }
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
# pip's own progress: bars on a terminal; on a log (CI) one line per package, without the
# long list of what is already there
pip_install() {
  if [ -t 1 ]; then pip install "$@"; else pip install --progress-bar off "$@" | { grep -v '^Requirement already satisfied' || true; }; fi
}

if [ ! -x "$VENV/bin/python" ]; then
  step "creating the virtual environment $VENV ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if has_gpu; then
    step "installing PyTorch (CUDA build, about 3 GB: a few minutes)"
    pip_install "torch>=2.4"
  else
    # the CPU wheel; set TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu where no local wheel exists
    step "installing PyTorch (CPU build, about 0.8 GB)"
    pip_install "torch==2.13.0" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple}
  fi
fi
all=$( (sort -u "$stamp" 2>/dev/null; echo "$wanted") | grep -v '^$' | sort -u | paste -sd, - || true)
step "installing kvlab${all:+ with extras [$all]} and its dependencies"
pip_install -e ".${all:+[$all]}"
step "checking the install"
"$VENV/bin/kvlab" --help >/dev/null
echo "$all" | tr ',' '\n' >"$stamp"
step "done: $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV (activate with: source $VENV/bin/activate)"
