#!/usr/bin/env bash
# Create .venv and install the project with every extra (idempotent; reruns are quick).
# Needs Python 3.11 (pyproject.toml: requires-python >=3.11,<3.12): python3.11 on PATH, or
# PYTHON=/path/to/python3.11. torch is pinned to the CPU wheel this project is developed against.
set -euo pipefail
cd "$(dirname "$0")/.."
# python3.11, else a python3 that is 3.11 (checked below)
PYTHON=${PYTHON:-$(command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)}
EXTRAS=train,export,serve,dev

need_311() {
  echo "bootstrap: $1" >&2
  echo "bootstrap: this project needs Python 3.11 (pyproject.toml: requires-python >=3.11,<3.12)." >&2
  echo "bootstrap: install it (e.g. apt-get install python3.11 python3.11-venv, or pyenv install 3.11)," >&2
  echo "bootstrap: or name one: PYTHON=/path/to/python3.11 bash scripts/bootstrap.sh" >&2
  exit 1
}

if [ -x .venv/bin/python ]; then
  venv_version=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$venv_version" = 3.11 ] || need_311 ".venv has Python $venv_version; remove it (rm -rf .venv) and run this again"
else
  command -v "$PYTHON" >/dev/null 2>&1 || need_311 "no $PYTHON found"
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || need_311 "$PYTHON did not run (see above)"
  [ "$version" = 3.11 ] || need_311 "$PYTHON is Python $version"
  echo "bootstrap: creating .venv with $("$PYTHON" --version) ($(command -v "$PYTHON"))"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing torch==2.13.0 and this project with extras $EXTRAS into .venv"
  echo "bootstrap: the first install downloads the packages (about 2.3 GB once installed in .venv) and takes a few minutes;"
  echo "bootstrap: later runs only check them"
  # pip -q, less its notes about local package folders this machine lacks; a failed install stops here.
  pip_install() {
    .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } ||
      { echo "bootstrap: pip install $* failed (see above)" >&2; exit 1; }
  }
  echo "bootstrap: [1/4] pip"
  pip_install --upgrade pip
  echo "bootstrap: [2/4] torch==2.13.0"
  pip_install "torch==2.13.0"
  echo "bootstrap: [3/4] the project, editable, with [$EXTRAS]"
  # setuptools' "Editable installation" notice (an InformationOnly warning on how editable
  # imports resolve) is the one warning the build prints: not a problem of this project.
  PYTHONWARNINGS="ignore:Editable installation" pip_install -e ".[$EXTRAS]"
  echo "bootstrap: [4/4] checking that torch, onnxruntime, transformers and teran import"
  .venv/bin/python -c "import torch, onnxruntime, transformers, teran"
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "bootstrap: .venv is ready"
fi
