#!/usr/bin/env bash
# TransMLA on SmolLM2-135M healed by distillation (issue 17 item 3): convert (latent rank 128, one 64-dim
# RoPE head: half the GQA cache's bytes), then X-EcoMLA-style KL distillation of the attention projections
# on WikiText-2 validation, then WikiText-2 test perplexity as in latent_ppl.sh.
# Usage: KVJAX_DATA=/path/to/shared/data bash experiments/latent_distill.sh [OUT_DIR] [STEPS]
set -euo pipefail
out=${1:-experiments/results/latent}
steps=${2:-60}
tmp=$(mktemp -d)
mkdir -p "$out"
kvjax convert mla --kv-rank 128 --rope-dim 64 --out "$tmp/mla128"
kvjax train distill --student "$tmp/mla128" --data "$KVJAX_DATA/wikitext-2/valid.txt" --steps "$steps" \
  --batch-size 4 --seq-len 256 --lr 1e-4 --log-every 5 --out "$tmp/healed"
cp "$tmp/healed/metrics.jsonl" "$out/mla128_distill_metrics.jsonl"
kvjax eval ppl --model "$tmp/healed" --n 4 --context-len 1024 --eval-len 256 --no-plots --overwrite \
  --out "$out/mla128_healed_ppl.csv"
rm -rf "$tmp"
