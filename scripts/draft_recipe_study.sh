#!/usr/bin/env bash
# The drafts issue's recipe comparison for the SPD n=2 draft, every variant from scratch on the same
# data pool, the same time each, judged by the same eval-draft replay:
#   base    KL, Ls 1, draft vocabulary 8192, the whole pool (LIMIT conversations)
#   epochs  as base on the first SMALL conversations only (more epochs of less data, same compute)
#   ls2     Ls 2 (a second PDM layer: costs rank 0 drafting time)
#   v16k    draft vocabulary 16384
#   topk    KL plus HASS's top-K distillation term (K 10)
# Teacher features are computed once (bfloat16 teacher pass, TEACHER_THREADS) into OUT/cache and
# read by every variant; PARALLEL variants run at a time with THREADS threads each.
# Usage: scripts/draft_recipe_study.sh OUT DATA.jsonl [LIMIT] [SMALL] [TRAIN_S]
# Environment: PY, DEVICE, THREADS, TEACHER_THREADS, PARALLEL, MICRO, EVAL_DATA, EVAL_LIMIT, EVAL_TOKENS.
set -euo pipefail
OUT=$1 DATA=$2 LIMIT=${3:-5000} SMALL=${4:-800} TRAIN_S=${5:-780}
PY=${PY:-python3} DEVICE=${DEVICE:-cpu} THREADS=${THREADS:-1} PARALLEL=${PARALLEL:-2} MICRO=${MICRO:-1}
mkdir -p "$OUT"
common=(--device "$DEVICE" --stages 16,14 --data "$DATA" --max-len 512 --teacher-dtype bfloat16 --teacher-batch 8
        --cache-dir "$OUT/cache" --epochs 1000 --lr 2e-3 --batch-tokens 4096 --micro-batch "$MICRO" --val-every 50
        --save-every 50)
# 1. teacher features for the whole pool, once (no training step: the time limit is spent at once)
$PY -m spdecode train "${common[@]}" --limit "$LIMIT" --threads "${TEACHER_THREADS:-2}" --time-limit 0.001 \
    --out "$OUT/warm" > "$OUT/warm.log" 2>&1
variant() {  # NAME ARGS...
    local name=$1; shift
    [ -f "$OUT/$name/train_log.json" ] && return 0  # done by an earlier invocation
    $PY -m spdecode train "${common[@]}" --threads "$THREADS" --time-limit "$TRAIN_S" "$@" --out "$OUT/$name" \
        > "$OUT/$name.log" 2>&1 || echo "$name failed (see $OUT/$name.log)"
    $PY -m spdecode eval-draft --device "$DEVICE" --threads "$THREADS" --stages 16,14 --draft "$OUT/$name" \
        --data "${EVAL_DATA:-mt_bench,gsm8k,humaneval}" --limit "${EVAL_LIMIT:-8}" --max-new-tokens "${EVAL_TOKENS:-128}" \
        --json-out "$OUT/eval-$name.json" > "$OUT/eval-$name.log" 2>&1 || echo "eval of $name failed"
}
names=(base epochs ls2 v16k topk)
args=("--limit $LIMIT" "--limit $SMALL" "--limit $LIMIT --layers 2" "--limit $LIMIT --draft-vocab 16384"
      "--limit $LIMIT --topk 10")
for i in "${!names[@]}"; do
    # shellcheck disable=SC2086  # the arguments are words on purpose
    variant "${names[$i]}" ${args[$i]} &
    if (( (i + 1) % PARALLEL == 0 )); then wait; fi
done
wait
for name in "${names[@]}"; do
    echo "== $name"; grep -h "training sequences\|done:" "$OUT/$name.log" || true
    tr '\r' '\n' < "$OUT/eval-$name.log" | grep -E '^(mt_bench|gsm8k|humaneval|overall) ' || true
done
