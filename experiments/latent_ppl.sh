#!/usr/bin/env bash
# Latent KV on SmolLM2-135M (issue 17): WikiText-2 perplexity against the cache's real bytes for
#  * Palu (training-free low-rank latents of pre-RoPE keys and values): per head (group=1) and joint over
#    the 3 KV heads (group=3), ratio = fraction of K/V bytes removed, bases from 4096 tokens of generated prose;
#  * TransMLA (kvjax convert mla): latent rank 128 / 64 with one 64-dim RoPE head (192 / 128 numbers per token
#    and layer against 384 for the GQA cache), before healing.
# Usage: KVJAX_DATA=/path/to/shared/data bash experiments/latent_ppl.sh [OUT_DIR]
set -euo pipefail
out=${1:-experiments/results/latent}
tmp=$(mktemp -d)
mkdir -p "$out"
common=(--n 4 --context-len 1024 --eval-len 256 --no-plots --overwrite)
kvjax eval ppl --method full palu "palu(group=3)" --ratio 0.5 0.75 "${common[@]}" --out "$out/palu_ppl.csv"
for rank in 128 64; do
  kvjax convert mla --kv-rank "$rank" --rope-dim 64 --out "$tmp/mla$rank"
  kvjax eval ppl --model "$tmp/mla$rank" "${common[@]}" --out "$out/mla${rank}_ppl.csv"
done
rm -rf "$tmp"
