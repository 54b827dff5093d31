#!/usr/bin/env bash
# Train the bundled EAGLE-style head for SmolLM2 on a CPU (how src/spdecode/drafts/smollm2-135m-eagle
# was made; see the drafts README for the numbers). Steps:
#   1. the target answers ShareGPT first turns itself (greedy, bf16) for REGEN_S seconds;
#   2. those answers plus RAW raw ShareGPT first exchanges (the teacher's distribution is the
#      target's either way; raw text only widens the contexts) form the data;
#   3. teacher features are computed once into a cache (the head's anchors, ~0.3 MB per 100 tokens);
#   4. one head per chain mode starts from the bundled n=2 SPD draft (its decoder layer, head,
#      projections and draft vocabulary) and trains for TRAIN_S seconds, one thread each;
#   5. the embed head (the one bundled) goes on for RESUME_S seconds with both threads.
# Usage: scripts/train_eagle_cpu.sh OUT_DIR [REGEN_S] [RAW] [TRAIN_S] [RESUME_S]
set -euo pipefail
OUT=$1 REGEN_S=${2:-900} RAW=${3:-400} TRAIN_S=${4:-1500} RESUME_S=${5:-1260}
PY=${PY:-python3}
mkdir -p "$OUT"
$PY -m spdecode regenerate --dtype bfloat16 --threads 2 --data sharegpt --limit 4000 --batch-size 32 \
    --max-new-tokens 256 --time-limit "$REGEN_S" --out "$OUT/regen.jsonl"
$PY "$(dirname "$0")/mix_conversations.py" "$OUT" "$RAW"
common=(--chain-depth 4 --init src/spdecode/drafts/smollm2-135m-n2 --data "$OUT/mix.jsonl" --limit 100000
        --max-len 512 --val-frac 0.03 --epochs 100 --lr 1e-3 --batch-tokens 4096 --val-every 50 --save-every 25
        --cache-dir "$OUT/features")
# Warm the feature cache once with both cores (a 1-second run), then train both modes side by side.
$PY -m spdecode train --eagle embed "${common[@]}" --threads 2 --time-limit 1 --out "$OUT/warm" > "$OUT/warm.log" 2>&1
for mode in embed feedback; do
    OMP_NUM_THREADS=1 $PY -m spdecode train --eagle $mode "${common[@]}" --threads 1 --time-limit "$TRAIN_S" \
        --out "$OUT/head-$mode" > "$OUT/train-$mode.log" 2>&1 &
done
wait
$PY -m spdecode train --eagle embed "${common[@]}" --threads 2 --time-limit "$RESUME_S" --resume \
    --out "$OUT/head-embed" > "$OUT/train-embed-2.log" 2>&1
