#!/usr/bin/env bash
# Create .venv and install the project (idempotent: a second call with an unchanged pyproject is instant).
# The CPU build of torch is installed first when no torch is present; on a GPU machine install the
# CUDA build you want into .venv before running this. --no-compile: modules are byte-compiled when first imported
# (a few hundred of torch's thousands), not all at install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --no-compile --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q --no-compile "torch==2.13.0" \
    || .venv/bin/python -m pip install -q --no-compile "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q --no-compile -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
