#!/usr/bin/env bash
# The evaluation tables of SmolLM2-135M-Instruct in experiments/results/eval/ (CSV, markdown, PNG).
# Run from the repository root with the project's virtualenv active:  bash experiments/eval_smollm2.sh [TASK...]
# Each task's wall time is appended to experiments/results/eval/times.txt. Same seed, same numbers.
set -euo pipefail
export KVJAX_DATA="${KVJAX_DATA:-../shared/data}"  # the published tables: essays and WikiText-2 from there
OUT=experiments/results/eval
METHODS="full streaming_llm snapkv pyramidkv tova knorm observed_attention expected_attention adakv:snapkv"
RATIOS="0.25 0.5 0.75 0.9"
mkdir -p "$OUT"
run() {  # run NAME ARGS...: time one kvjax eval call
  local name=$1; shift
  local t0=$(date +%s)
  kvjax eval "$@" --out "$OUT/$name.csv" --overwrite --seed 0
  echo "$name: $(( $(date +%s) - t0 )) s (kvjax eval $*)" >> "$OUT/times.txt"
}
tasks=("$@")
[ $# -gt 0 ] || tasks=(passkey niah ppl)
for task in "${tasks[@]}"; do
  case $task in
    passkey) run passkey passkey --method $METHODS --ratio $RATIOS --lengths 1024 2048 4096 --n 10 --batch 10 ;;
    passkey_qa) run passkey_qa passkey --question-in-context --method $METHODS --ratio $RATIOS --lengths 1024 2048 4096 --n 10 --batch 10 ;;
    niah) run niah niah --method $METHODS --ratio $RATIOS --lengths 1024 2048 4096 --depths 0 0.25 0.5 0.75 1 --n 1 --batch 5 ;;
    ruler) run ruler ruler --method $METHODS --ratio 0.5 --lengths 1024 --n 2 ;;
    ppl) run ppl ppl --method $METHODS --ratio $RATIOS --context-len 2048 --eval-len 128 --n 4 --batch 4 ;;
    bench) run bench bench --method $METHODS --ratio 0.5 --lengths 4096 ;;
    *) echo "unknown task $task" >&2; exit 2 ;;
  esac
done
