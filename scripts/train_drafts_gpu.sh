#!/usr/bin/env bash
# Train the bundled SmolLM2 drafts (n=2 and n=4) on one GPU in minutes:
#   1. the target answers ShareGPT's first user turns itself (greedy, fp32), for REGEN_S seconds;
#   2. two `spdecode train` runs (n=2 and n=4) share the GPU for TRAIN_S seconds each.
# Usage: scripts/train_drafts_gpu.sh PROMPTS.jsonl OUT_DIR [REGEN_S] [TRAIN_S]
# PROMPTS.jsonl: conversations whose first turn is the user's (e.g. ShareGPT's, one per line).
set -euo pipefail
PROMPTS=$1 OUT=$2 REGEN_S=${3:-150} TRAIN_S=${4:-240}
PY=${PY:-python3} DEVICE=${DEVICE:-cuda} BATCH=${BATCH:-512} MAX_NEW=${MAX_NEW:-256}
mkdir -p "$OUT"
$PY -m spdecode regenerate --device "$DEVICE" --dtype float32 --data "$PROMPTS" --limit 1000000 \
    --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" --time-limit "$REGEN_S" --out "$OUT/regenerated.jsonl"
common=(--device "$DEVICE" --layers 1 --draft-vocab 8192 --data "$OUT/regenerated.jsonl" --limit 1000000
        --max-len 640 --val-frac 0.02 --epochs 1000 --lr 2e-3 --batch-tokens 32768 --micro-batch 32
        --teacher-batch 64 --val-every 200 --save-every 400 --time-limit "$TRAIN_S")
$PY -m spdecode train --stages 16,14 --out "$OUT/pdm-n2" "${common[@]}" > "$OUT/train-n2.log" 2>&1 &
p2=$!
$PY -m spdecode train --stages 8,8,7,7 --out "$OUT/pdm-n4" "${common[@]}" > "$OUT/train-n4.log" 2>&1 &
p4=$!
wait $p2 || echo "n=2 training failed"
wait $p4 || echo "n=4 training failed"
