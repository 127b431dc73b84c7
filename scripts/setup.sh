#!/usr/bin/env bash
# Set up .venv in the checkout: reuse an importable torch (e.g. the cluster's CUDA build), else install
# one that fits the machine (CPU wheels where there is no NVIDIA GPU), then this project with its extras.
# Usage: bash scripts/setup.sh [extra]        e.g. `bash scripts/setup.sh dev` for the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRA=${1:-}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv  # keep the torch the user already has
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip install --quiet)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4"
  else
    # A CPU wheel the package index already offers (e.g. a local mirror), else PyTorch's CPU index.
    version=${TORCH_VERSION:-2.13.0}
    "${PIP[@]}" "torch==$version+cpu" 2>/dev/null ||
      "${PIP[@]}" "torch==$version" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
        --extra-index-url https://pypi.org/simple
  fi
fi

stamp=.venv/.skillnet-installed${EXTRA:+-$EXTRA}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "${PIP[@]}" -e ".${EXTRA:+[$EXTRA]}"
  touch "$stamp"
fi
