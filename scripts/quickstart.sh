#!/usr/bin/env bash
# The main job on a fresh machine: set up, then build the tiny recipe end to end (about 15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,data  # data: the cleaning stage; serve: `lmforge serve` works on the result
. .venv/bin/activate
lmforge run recipes/tiny-cpu.yaml --out runs/tiny "$@"
