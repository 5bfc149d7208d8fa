#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the demo (python -m demo --help for options).
# It writes artifacts/demo/index.html, and artifacts/demo/contact-sheet.png when a headless
# Chromium is installed (apt-get install -y chromium chromium-driver; --screenshot PATH moves it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m demo "$@"
