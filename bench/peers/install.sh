#!/usr/bin/env bash
# Builds the llm-compressor peer's own venv (it pins its own transformers, so it cannot share .venv).
# Usage: bash bench/peers/install.sh [VENV_DIR]   (default bench/out/venv-llmcompressor, git-ignored)
# Writes VENV_DIR/versions.json with the versions it got.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/bench/out/venv-llmcompressor}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"       # newest release that installs here (pip download llmcompressor --no-deps)
PY="${PYTHON:-python3}"
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU torch wheel first, so llmcompressor's torch requirement is met without pulling CUDA wheels: a local CPU wheel
# (pip's find-links, e.g. /opt/wheels) when there is one, else the PyTorch CPU index, else PyPI.
CPU_WHEEL="$(ls ${PIP_FIND_LINKS:-/opt/wheels}/torch-*+cpu-cp*"$("$VENV/bin/python" -c 'import sys;print(f"{sys.version_info[0]}{sys.version_info[1]}")')"*.whl 2>/dev/null | sort -V | tail -1 || true)"
if [ -n "$CPU_WHEEL" ]; then
    "$VENV/bin/python" -m pip install -q "$CPU_WHEEL"
else
    "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu || "$VENV/bin/python" -m pip install -q torch
fi
"$VENV/bin/python" -m pip install -q "llmcompressor==$LLMC_VERSION" psutil safetensors
"$VENV/bin/python" - "$VENV/versions.json" <<'PY'
import json, sys
from importlib.metadata import version
names = ["llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "safetensors"]
v = {}
for n in names:
    try:
        v[n] = version(n)
    except Exception as e:  # noqa: BLE001
        v[n] = f"missing ({e})"
v["python"] = sys.version.split()[0]
json.dump(v, open(sys.argv[1], "w"), indent=1)
print(json.dumps(v))
PY
