#!/usr/bin/env bash
# Cross-layer K/V sharing (issue 19) on SmolLM2-135M: CLA by conversion (training-free and healed) and
# KVSharer plans at a few thresholds (and the similar-first ablation), against SnapKV eviction and
# KIVI-4, by perplexity and passkey against the cache bytes each configuration really holds.
# Run from the repository root with the project's virtualenv active:  bash experiments/crosslayer.sh [STEP...]
# Steps: plans (KVSharer searches, skipped if present), train (healing, skipped if present), ppl, passkey,
# merge (MiniCache and xKV: perplexity, passkey, MiniCache's retained fraction), report (tables and plot).
# Wall times are appended to experiments/results/crosslayer/cla_kvsharer_times.txt.
set -euo pipefail
OUT=experiments/results/crosslayer
DATA=../shared/data
HEALED=runs/cla_healed  # 40 steps; HEALED100 continues it to 100 steps (the schedule stretched on resume)
HEALED100=runs/cla_healed100
THRESHOLDS="0.9 0.8"
mkdir -p "$OUT"
timed() {  # timed NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s)
  "$@"
  echo "$name: $(( $(date +%s) - t0 )) s ($*)" >> "$OUT/cla_kvsharer_times.txt"
}
METHODS=(full cla "cla(layers=all)" "compose(cla,kivi-4)" "compose(cla(layers=all),kivi-4)" kivi-4 snapkv)
for t in $THRESHOLDS; do METHODS+=("kvsharer(plan=$OUT/kvsharer_t$t.json)"); done
METHODS+=("kvsharer(plan=$OUT/kvsharer_similar_t0.9.json)")
# MiniCache (pairs from layer 15 on, both retention readings) and xKV (groups of 4 from layer 2; the paper's ranks
# per width, 96/160, and the smaller 48/96), alone and with KIVI-4 (the paper's 4-bit MiniCache)
MERGE_METHODS=(minicache "minicache(retention=threshold)" xkv "xkv(rank_k=48,rank_v=96)" "compose(minicache,kivi-4)"
               "compose(xkv,kivi-4)")
RATIOS="0.25 0.5"  # SnapKV: the cache of cla (23 of 30 layers) and cla(layers=all) (15 of 30)
steps=("$@")
[ $# -gt 0 ] || steps=(plans train ppl passkey merge report)
for step in "${steps[@]}"; do
  case $step in
    plans)
      for t in $THRESHOLDS; do
        [ -f "$OUT/kvsharer_t$t.json" ] || timed "kvsharer_t$t" kvjax kvsharer --threshold "$t" --max-tries 40 \
          --out "$OUT/kvsharer_t$t.json"
      done
      [ -f "$OUT/kvsharer_similar_t0.9.json" ] || timed kvsharer_similar kvjax kvsharer --threshold 0.9 \
        --order similar --max-tries 40 --out "$OUT/kvsharer_similar_t0.9.json" ;;
    train)
      [ -d "$HEALED/checkpoints" ] || timed train_cla kvjax train cla --spec cla --data "$DATA/wikitext-2/valid.txt" \
        --steps 40 --batch-size 4 --seq-len 128 --lr 3e-4 --warmup 4 --save-every 10 --log-every 2 --out "$HEALED"
      [ -d "$HEALED100/checkpoints" ] || { cp -r "$HEALED" "$HEALED100" && timed train_cla_100 kvjax train cla \
        --spec cla --data "$DATA/wikitext-2/valid.txt" --steps 100 --batch-size 4 --seq-len 128 --lr 3e-4 \
        --warmup 4 --save-every 10 --log-every 2 --out "$HEALED100" --resume; }
      cp "$HEALED100/metrics.jsonl" "$OUT/cla_train_metrics.jsonl" ;;
    ppl)
      timed ppl kvjax eval ppl --method "${METHODS[@]}" --ratio $RATIOS --text "$DATA/wikitext-2/test.txt" \
        --context-len 512 --eval-len 64 --n 2 --batch 2 --out "$OUT/cla_kvsharer_ppl.csv" --overwrite --seed 0 \
        --no-plots
      timed ppl_healed kvjax eval ppl --model "$HEALED" --method cla "compose(cla,kivi-4)" \
        --text "$DATA/wikitext-2/test.txt" --context-len 512 --eval-len 64 --n 2 --batch 2 \
        --out "$OUT/cla_kvsharer_ppl_healed.csv" --overwrite --seed 0 --no-plots
      timed ppl_healed100 kvjax eval ppl --model "$HEALED100" --method cla --text "$DATA/wikitext-2/test.txt" \
        --context-len 512 --eval-len 64 --n 2 --batch 2 --out "$OUT/cla_kvsharer_ppl_healed100.csv" --overwrite \
        --seed 0 --no-plots ;;
    passkey)
      timed passkey kvjax eval passkey --method "${METHODS[@]}" --ratio $RATIOS --lengths 512 --n 4 --batch 4 \
        --out "$OUT/cla_kvsharer_passkey.csv" --overwrite --seed 0 --no-plots
      timed passkey_healed100 kvjax eval passkey --model "$HEALED100" --method cla --lengths 512 --n 4 --batch 4 \
        --out "$OUT/cla_kvsharer_passkey_healed100.csv" --overwrite --seed 0 --no-plots ;;
    merge)
      timed merge_ppl kvjax eval ppl --method "${MERGE_METHODS[@]}" --text "$DATA/wikitext-2/test.txt" \
        --context-len 512 --eval-len 64 --n 2 --batch 2 --out "$OUT/minicache_xkv_ppl.csv" --overwrite --seed 0 \
        --no-plots
      timed merge_passkey kvjax eval passkey --method "${MERGE_METHODS[@]}" --lengths 512 --n 4 --batch 4 \
        --out "$OUT/minicache_xkv_passkey.csv" --overwrite --seed 0 --no-plots
      timed minicache_retained python experiments/minicache_retained.py "$OUT/minicache_retained.md" "$DATA" ;;
    report) python experiments/crosslayer_report.py "$OUT" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
