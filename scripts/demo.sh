#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the demo (python -m demo --help for options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m demo "$@"
