#!/usr/bin/env bash
# Create .venv (once) and install lmforge into it with the given extras, CPU torch first.
# torch is installed on its own and pinned: a bare `torch` requirement would pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${LMFORGE_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".${extras:+[$extras]}"
