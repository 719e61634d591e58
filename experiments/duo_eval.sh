#!/usr/bin/env bash
# DuoAttention on SmolLM2-135M-Instruct: trained gates vs random head rankings vs kvpress's on-the-fly ranking,
# passkey and perplexity against real cache bytes. Scaled down for the 2-core CPU: streaming heads keep
# sink 16 + recent 48 (the paper's 128 + 256, the official eval scripts' 64 + 256, would hold most of a
# 1k-token prompt), gates trained 40 steps on 384-token windows with 4 pass keys over Paul Graham essays.
# Run from the repository root with the project's virtualenv active:  bash experiments/duo_eval.sh [STEP...]
set -euo pipefail
OUT=experiments/results/crosslayer
RUN=${RUN:-runs/duo}
W="sink=16, recent=48"
METHODS=(full "duo(gates=$OUT/duo_gates.npy, $W)" "duo(gates=$OUT/duo_random_gates.npy, $W)" "duo($W)")
mkdir -p "$OUT"
steps=("$@")
[ $# -gt 0 ] || steps=(train export passkey ppl report)
for step in "${steps[@]}"; do
  case $step in
    train) [ -d "$RUN/checkpoints" ] || kvjax train duo --model smollm2-135m --data ../shared/data/paul_graham_essays \
        --steps 40 --batch-size 1 --seq-len 384 --sink 16 --recent 48 --n-keys 4 --warmup 3 --save-every 10 \
        --log-every 2 --out "$RUN" ;;
    export) python experiments/duo_gates.py export --run "$RUN" --out "$OUT" ;;
    # on the fly, each layer streams round(ratio * 3) of its 3 KV heads: 0.5 and 0.75 both give 2, 0.33 gives 1
    passkey) kvjax eval passkey --method "${METHODS[@]}" --ratio 0.5 0.75 --lengths 1024 --n 10 --batch 10 \
        --out "$OUT/duo_passkey.csv" --overwrite --seed 0
      kvjax eval passkey --method "duo($W)" --ratio 0.33 --lengths 1024 --n 10 --batch 10 \
        --out "$OUT/duo_passkey.csv" --resume --seed 0 ;;
    ppl) kvjax eval ppl --method "${METHODS[@]}" --ratio 0.5 0.75 --context-len 1024 --eval-len 128 --n 4 --batch 4 \
        --out "$OUT/duo_ppl.csv" --overwrite --seed 0
      kvjax eval ppl --method "duo($W)" --ratio 0.33 --context-len 1024 --eval-len 128 --n 4 --batch 4 \
        --out "$OUT/duo_ppl.csv" --resume --seed 0 ;;
    report) python experiments/duo_gates.py report --out "$OUT" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
