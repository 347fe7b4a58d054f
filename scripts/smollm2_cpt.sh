#!/usr/bin/env bash
# Continued pretraining of SmolLM2-135M-Instruct on three classical Chinese novels, with English
# replay (25% of every batch) and without: Chinese and English bits per byte and MMLU before and
# after. The figures are in docs/continued-pretraining.md. The part with replay took 77 minutes on
# 2 shared CPU cores (evaluations 49, training 27); the run without replay adds as much again.
#   lmforge fetch smollm2-135m-instruct && scripts/smollm2_cpt.sh 2>&1 | tee runs/smollm2-cpt.log
set -euo pipefail
M=${M:-$HOME/.cache/lmforge/models/smollm2-135m-instruct}
R=runs/smollm2-cpt
mkdir -p "$R"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
timed() {  # run a command, then log its wall time
    local t0=$SECONDS
    "$@"
    log "done in $((SECONDS - t0)) s: $*"
}

# held-out Chinese from a fourth novel, 西游记, that no run trains on: 4,000 characters of
# chapter text (paragraph lines 3001 on, blank lines dropped)
python - "$R/xiyou_heldout.txt" <<'EOF'
import gzip, sys
with gzip.open("datasets/chinese/novel_xiyou_ji.txt.gz", "rt", encoding="utf-8") as f:
    lines = [l.strip() for i, l in enumerate(f) if i >= 3000 and l.strip()]
open(sys.argv[1], "w", encoding="utf-8").write("\n".join(lines)[:4000] + "\n")
EOF

log "prepare: English (replay and held-out) and Chinese, with SmolLM2's tokenizer"
timed lmforge prepare --config recipes/smollm2-cpt-en.yaml --tokenizer-dir "$M"
timed lmforge prepare --config recipes/smollm2-cpt-zh.yaml --tokenizer-dir "$M"

evaluate() {  # NAME MODEL: bits per byte on the held-out text (8,192 tokens each), MMLU
    timed lmforge eval "$2" --out "$R/eval_$1/lm" --limit 8192 --tasks \
        "lm:runs/smollm2-cpt-zh/data,lm:$R/xiyou_heldout.txt,lm:runs/smollm2-cpt-en/data"
    timed lmforge eval "$2" --out "$R/eval_$1/mmlu" --tasks mmlu --limit 200
}

log "base model"
evaluate base "$M"
log "continued pretraining with English replay"
timed lmforge pretrain --config recipes/smollm2-cpt-zh.yaml --out "$R/replay" \
    --data-dir runs/smollm2-cpt-zh/data
evaluate replay "$R/replay/pretrain/model"
log "continued pretraining without replay"
timed lmforge pretrain --config recipes/smollm2-cpt-zh.yaml --out "$R/noreplay" \
    --data-dir runs/smollm2-cpt-zh/data --replay_fraction 0
evaluate noreplay "$R/noreplay/pretrain/model"
log "all done"
