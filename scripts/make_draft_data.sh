#!/usr/bin/env bash
# The drafts' training data, from the packages alone (no hub), on a CPU or a lent GPU:
#   1. the target's greedy answers to ShareGPT's distinct first user turns;
#   2. its sampled answers (temperature 0.7) to the same turns;
#   3. prompts the target writes itself from topic seeds (explanations, writing, word problems,
#      Python functions), answered greedily;
#   4. near-duplicates and anything sharing a 13-word n-gram with the evaluation sets dropped.
# Every step appends as it goes: rerun the same command to resume an interrupted one.
# Usage: scripts/make_draft_data.sh OUT_DIR [SECONDS_PER_STEP] [SYNTH_COUNT]
# Environment: PY, DEVICE (cpu|cuda), DTYPE, BATCH, MAX_NEW, THREADS.
set -euo pipefail
OUT=$1 STEP_S=${2:-600} SYNTH=${3:-20000}
PY=${PY:-python3} DEVICE=${DEVICE:-cpu} DTYPE=${DTYPE:-bfloat16} BATCH=${BATCH:-32} MAX_NEW=${MAX_NEW:-256}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
common=(--device "$DEVICE" --dtype "$DTYPE" --threads "$THREADS" --batch-size "$BATCH" --max-new-tokens "$MAX_NEW"
        --time-limit "$STEP_S")
$PY -m spdecode regenerate "${common[@]}" --data sharegpt --limit 1000000 --out "$OUT/greedy.jsonl"
$PY -m spdecode regenerate "${common[@]}" --data sharegpt --limit 1000000 --temperature 0.7 --top-p 0.95 \
    --seed 1 --out "$OUT/sampled.jsonl"
$PY -m spdecode data synth "${common[@]}" --count "$SYNTH" --out "$OUT/synth"
$PY -m spdecode data clean --data "$OUT/greedy.jsonl,$OUT/sampled.jsonl,$OUT/synth/answers.jsonl" \
    --out "$OUT/mix.jsonl" | tee "$OUT/clean.log"
