#!/usr/bin/env bash
# Every bundled SmolLM2 drafter retrained on the cleaned data of scripts/make_draft_data.sh, in one
# go on one lent GPU (the drafts issue's recipe run; about 12 minutes with the defaults):
#   1. data: greedy and sampled answers to ShareGPT's first turns, self-synthesized prompts and
#      their answers, deduplicated and decontaminated (DATA_S seconds per step);
#   2. SPD n=2 and n=4 (one node per slot) side by side, then the tree-ready n=2 draft and the
#      EAGLE-style head side by side, TRAIN_S seconds each, from the bundled drafts.
# Usage: scripts/retrain_drafts_gpu.sh OUT_DIR [DATA_S] [SYNTH_COUNT] [TRAIN_S]
# Environment: PY, DEVICE (default cuda), BATCH (regeneration batch), MICRO (training micro-batch),
# MAX_NEW (answer tokens), EVAL_LIMIT and EVAL_TOKENS (eval-draft prompts per set, tokens).
set -euo pipefail
OUT=$1 DATA_S=${2:-100} SYNTH=${3:-8000} TRAIN_S=${4:-150}
PY=${PY:-python3} DEVICE=${DEVICE:-cuda} BATCH=${BATCH:-512} MICRO=${MICRO:-32}
HERE=$(dirname "$0") DRAFTS=$(dirname "$0")/../src/spdecode/drafts
mkdir -p "$OUT"
PY=$PY DEVICE=$DEVICE DTYPE=float32 BATCH=$BATCH THREADS=${THREADS:-8} "$HERE/make_draft_data.sh" "$OUT/data" \
    "$DATA_S" "$SYNTH"
common=(--device "$DEVICE" --data "$OUT/data/mix.jsonl" --limit 10000000 --max-len 640 --val-frac 0.02 --epochs 1000
        --lr 1e-3 --micro-batch "$MICRO" --teacher-batch 64 --val-every 200 --save-every 400 --time-limit "$TRAIN_S")
run() {  # NAME ARGS...: one training run, its log beside it
    local name=$1; shift
    $PY -m spdecode train "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || echo "$name failed"
}
run n2 --stages 16,14 --init "$DRAFTS/smollm2-135m-n2" --batch-tokens 32768 &
run n4 --stages 8,8,7,7 --init "$DRAFTS/smollm2-135m-n4" --batch-tokens 32768 &
wait
run n2-tree --tree --chain-depth 2 --stages 13,17 --anchors 0,13,30 --init "$DRAFTS/smollm2-135m-n2-tree" \
    --batch-tokens 16384 &
run eagle --eagle embed --chain-depth 4 --init "$DRAFTS/smollm2-135m-eagle" --batch-tokens 16384 &
wait
for d in n2 n4; do
    $PY -m spdecode eval-draft --device "$DEVICE" --stages "${d#n}" --draft "$OUT/$d" --data mt_bench,gsm8k,humaneval \
        --limit "${EVAL_LIMIT:-80}" --max-new-tokens "${EVAL_TOKENS:-256}" --json-out "$OUT/eval-$d.json" | tee "$OUT/eval-$d.log"
done
