#!/usr/bin/env bash
# Train the bundled tree-ready SPD draft for SmolLM2 on a CPU (how src/spdecode/drafts/smollm2-135m-n2-tree
# was made; see the drafts README for the numbers). Steps:
#   1. the target answers ShareGPT first turns itself (greedy, bf16) for REGEN_S seconds (skipped
#      when OUT_DIR/regen.jsonl exists);
#   2. those answers plus RAW raw ShareGPT first exchanges form the data (as for the eagle head);
#   3. teacher features are computed once into a cache with both threads;
#   4. the draft starts from the bundled n=2 SPD draft and trains on paths through draft trees in
#      flight (`--tree`: 0..2 rows at each depth) for TRAIN_S seconds on THREADS threads.
# Usage: scripts/train_tree_cpu.sh OUT_DIR [REGEN_S] [RAW] [TRAIN_S] [THREADS]
set -euo pipefail
OUT=$1 REGEN_S=${2:-900} RAW=${3:-400} TRAIN_S=${4:-3000} THREADS=${5:-1}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ ! -s "$OUT/regen.jsonl" ]; then
    $PY -m spdecode regenerate --dtype bfloat16 --threads 2 --data sharegpt --limit 4000 --batch-size 32 \
        --max-new-tokens 256 --time-limit "$REGEN_S" --out "$OUT/regen.jsonl"
fi
$PY "$(dirname "$0")/mix_conversations.py" "$OUT" "$RAW"
common=(--tree --chain-depth 2 --stages 13,17 --anchors 0,13,30 --init src/spdecode/drafts/smollm2-135m-n2
        --data "$OUT/mix.jsonl" --limit 100000 --max-len 512 --val-frac 0.03 --epochs 100 --lr 1e-3
        --batch-tokens 4096 --val-every 25 --save-every 25 --cache-dir "$OUT/features")
# Warm the feature cache once with both cores (a 1-second run), then train.
$PY -m spdecode train "${common[@]}" --threads 2 --time-limit 1 --out "$OUT/warm" > "$OUT/warm.log" 2>&1
OMP_NUM_THREADS=$THREADS $PY -m spdecode train "${common[@]}" --threads "$THREADS" --time-limit "$TRAIN_S" \
    --out "$OUT/draft" > "$OUT/train.log" 2>&1
