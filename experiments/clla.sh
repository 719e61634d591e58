#!/usr/bin/env bash
# CLLA by conversion on SmolLM2-135M (issue 17 item 4, arXiv 2410.15252), step by step against real bytes:
#  1. latent: TransMLA, latent rank 128 + one 64-dim RoPE head (latent_ppl.sh's mla128 row);
#  2. shared: groups of adjacent layers share the latent (kvjax convert clla), training-free, ablating the
#     group size (2, 3) and which layers share (all, the deep half);
#  3. int4: the shared latent in a 4-bit store (--quant per_token-4) and a kivi-4 store (the granularity
#     ablation), then healed by distillation through the 4-bit round trip (--fake-quant per_token-4).
# WikiText-2 test perplexity as in latent_ppl.sh (4 chunks of 1024 + 256 tokens, float32, CPU).
# Usage: KVJAX_DATA=/path/to/shared/data bash experiments/clla.sh [OUT_DIR] [STEPS]
set -euo pipefail
out=${1:-experiments/results/latent}
steps=${2:-60}
tmp=$(mktemp -d)
mkdir -p "$out"
common=(--n 4 --context-len 1024 --eval-len 256 --no-plots --overwrite)
for plan in "2 all" "3 all" "2 deep"; do
  set -- $plan
  name="clla_g$1_$2"
  kvjax convert clla --kv-rank 128 --rope-dim 64 --group "$1" --layers "$2" --out "$tmp/$name"
  kvjax eval ppl --model "$tmp/$name" --quant none per_token-4 kivi-4 "${common[@]}" --out "$out/${name}_ppl.csv"
done
kvjax train distill --student "$tmp/clla_g2_all" --fake-quant per_token-4 --data "$KVJAX_DATA/wikitext-2/valid.txt" \
  --steps "$steps" --batch-size 4 --seq-len 256 --lr 1e-4 --log-every 5 --out "$tmp/healed"
cp "$tmp/healed/metrics.jsonl" "$out/clla_g2_all_distill_metrics.jsonl"
kvjax eval ppl --model "$tmp/healed" --quant none per_token-4 "${common[@]}" --out "$out/clla_g2_all_healed_ppl.csv"
rm -rf "$tmp"
