#!/usr/bin/env bash
# The anchor a CPU user would pick: llama.cpp (llama-cpp-python, built from its PyPI source package
# in a venv of its own) decoding the very GGUF our default model is converted from, on the same
# prompts, token ids and threads as `spdecode bench`, side by side with our AR and eagle.
#
#   scripts/bench_llamacpp.sh [DATA.jsonl] [LIMIT] [MAX_NEW_TOKENS] [ROUNDS]
#
# The build takes tens of minutes on 2 cores, once (the venv is kept under
# ${SPDECODE_CACHE:-~/.cache/spdecode}/llamacpp-venv); it is never part of make or the tests.
# Rounds alternate llama.cpp and spdecode bench; medians over rounds are printed at the end.
# Results: $OUT (default ./llamacpp-bench), one JSON per run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/eval_data/mt_bench/question.jsonl}
LIMIT=${2:-12}
NEW=${3:-128}
ROUNDS=${4:-3}
THREADS=${THREADS:-"1 2"}  # llama.cpp's; spdecode's --ar-sweep runs 1 up to every usable core
# Our side: AR swept over every backend and thread count (--ar-sweep; int4w where the checkpoint is
# a Q4 one, as ours is), eagle on BACKEND and on int4w.
METHOD=${METHOD:-ar,eagle,eagle:backend=int4w}
BACKEND=${BACKEND:-fp16w}
OUT=${OUT:-llamacpp-bench}
VERSION=0.3.36
CACHE=${SPDECODE_CACHE:-$HOME/.cache/spdecode}
# ALLOW="avx avx2 fma f16c bmi2" builds for those instruction sets only (e.g. to stand in for an
# AVX2-only CPU beside torch capped by ATEN_CPU_CAPABILITY=avx2 and friends), in a venv of its own.
ALLOW=${ALLOW:-}
LVENV=$CACHE/llamacpp-venv${ALLOW:+-$(echo "$ALLOW" | tr ' ' '-')}
PY=.venv/bin/python
mkdir -p "$OUT"

if ! "$LVENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python $VERSION from source into $LVENV (tens of minutes on 2 cores)" >&2
  python3 -m venv "$LVENV"
  # Compiled for this CPU's instruction sets, as GGML_NATIVE would, but without AMX: its tile
  # instructions fault in a process the kernel has not granted AMX state (KVM guests), which
  # torch requests and ggml 0.3.36 does not.
  flags=${ALLOW:-$(grep -m1 '^flags' /proc/cpuinfo || true)}
  [ -n "$flags" ] || { echo "no x86 flags in /proc/cpuinfo: set ALLOW to the instruction sets to build for" >&2; exit 1; }
  args="-DGGML_NATIVE=OFF"
  for f in avx avx2 fma f16c bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 avx_vnni; do
    opt=$(echo "$f" | tr a-z A-Z); [ "$opt" = AVX512F ] && opt=AVX512; [ "$opt" = AVX512VBMI ] && opt=AVX512_VBMI
    if [[ " $flags " == *" $f "* ]]; then args="$args -DGGML_$opt=ON"; else args="$args -DGGML_$opt=OFF"; fi
  done
  echo "CMAKE_ARGS=$args" >&2
  CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$LVENV/bin/pip" install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
fi

# Same token ids for both: the prompts encoded once by our tokenizer and chat template.
$PY scripts/llamacpp_anchor.py prompts --data "$DATA" --limit "$LIMIT" --out "$OUT/prompts.json"
for round in $(seq 1 "$ROUNDS"); do
  for t in $THREADS; do
    "$LVENV/bin/python" scripts/llamacpp_anchor.py decode --prompts "$OUT/prompts.json" --threads "$t" \
      --max-new-tokens "$NEW" --out "$OUT/llamacpp-t$t-r$round.json"
  done
  .venv/bin/spdecode bench --method "$METHOD" --backend "$BACKEND" --ar-sweep --data "$DATA" --limit "$LIMIT" --max-new-tokens "$NEW" \
    --json-out "$OUT/spdecode-r$round.json" > "$OUT/spdecode-r$round.log"
done
$PY scripts/llamacpp_anchor.py summary --dir "$OUT"
