#!/usr/bin/env bash
# Trained compressors (Locret, MatryoshkaKV) against heuristics at equal cache bytes, on SmolLM2-135M-Instruct.
# Run from the repository root with the project's virtualenv active:  bash experiments/eval_trained.sh [STEP...]
# Steps: train (both runs, skipped if present), passkey, ppl, matryoshka (ppl vs cache size, PCA vs trained).
# Wall times are appended to experiments/results/trained/times.txt.
set -euo pipefail
OUT=experiments/results/trained
DATA=../shared/data
LOCRET=runs/locret
MATRYOSHKA=runs/matryoshka
RATIOS="0.5 0.75 0.875"  # 0.875 = MatryoshkaKV's smallest rank (8 of 64)
METHODS=(full streaming_llm snapkv knorm "locret(checkpoint=$LOCRET)" "matryoshka(checkpoint=$MATRYOSHKA)")
mkdir -p "$OUT"
timed() {  # timed NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s)
  "$@"
  echo "$name: $(( $(date +%s) - t0 )) s ($*)" >> "$OUT/times.txt"
}
steps=("$@")
[ $# -gt 0 ] || steps=(train passkey ppl matryoshka)
for step in "${steps[@]}"; do
  case $step in
    train)
      [ -d "$LOCRET/checkpoints" ] || timed train_locret kvjax train locret --data "$DATA/wikitext-2/valid.txt" \
        --steps 200 --batch-size 4 --seq-len 512 --save-every 25 --log-every 5 --out "$LOCRET"
      [ -d "$MATRYOSHKA/checkpoints" ] || timed train_matryoshka kvjax train matryoshka \
        --data "$DATA/wikitext-2/valid.txt" --steps 300 --batch-size 4 --seq-len 256 --save-every 50 --out "$MATRYOSHKA" ;;
    passkey) timed passkey kvjax eval passkey --method "${METHODS[@]}" --ratio $RATIOS --lengths 1024 2048 4096 \
        --n 10 --batch 10 --out "$OUT/passkey.csv" --overwrite --seed 0 ;;
    ppl) timed ppl kvjax eval ppl --method "${METHODS[@]}" --ratio $RATIOS --context-len 2048 --eval-len 128 --n 4 \
        --batch 4 --out "$OUT/ppl.csv" --overwrite --seed 0 ;;
    matryoshka) timed matryoshka_ppl python experiments/matryoshka_ppl.py --run "$MATRYOSHKA" --search 0.5 \
        --out "$OUT/matryoshka" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
