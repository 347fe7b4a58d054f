#!/usr/bin/env bash
# Build a model from zero: set up, then the tiny recipe end to end (clean, tokenizer, pretrain,
# SFT, reward, DPO, evaluation; about 15 min on 2 CPU cores). runs/tiny/REPORT.md has the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,data  # data: the cleaning stage; serve: `lmforge serve` on the result
. .venv/bin/activate
lmforge run recipes/tiny-cpu.yaml --out runs/tiny "$@"
