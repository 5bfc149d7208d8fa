#!/usr/bin/env bash
# Create .venv and install the project with every extra (idempotent; reruns are quick).
# torch is pinned to the CPU wheel this project is developed against.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing dependencies (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[train,export,serve,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, onnxruntime, transformers, teran" 
  rm -f .venv/.installed-*
  touch "$stamp"
fi
