#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, type-check the serving packages, then run the
# whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
