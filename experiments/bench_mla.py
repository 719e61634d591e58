"""Decode speed and bytes of the MLA latent cache (absorbed and expanded forms) against a dense cache.

    python experiments/bench_mla.py [--contexts 2048 8192] [--layers 2] [--new-tokens 8] [--repeats 2]
        [--out experiments/results/bench_mla.md]

Random weights at DeepSeek-V2-Lite's attention sizes (d_model 2048, 16 heads, d_c 512, RoPE 64, no-RoPE
128, values 128; a small dense MLP, no MoE, so attention dominates), float32, and a dense Llama-style
MHA model of the same width (16 heads x 128: what the expanded K/V would take in a per-head cache).
Three configurations, timed in interleaved rounds (`bench_common.decode_runs`):

* `mla absorbed`: decode steps attend in latent space (W^UK folded into the query, W^UV on the output);
* `mla expanded`: decode steps up-project every cached latent to per-head K/V (`mla_absorb="never"`);
* `dense MHA`: a `DenseKV` per layer of 16 heads x 128.

"cache bytes / layer" is what each decode step reads per layer: every used slot of the state once
(latents and RoPE keys, or K and V, plus positions), the cache's `nbytes` at that context divided by
the layers (the expanded form reads the same latents but recomputes per-head K/V from them). Not a test: numbers depend on the machine (printed with its CPU line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

import kvjax
from kvjax.models import LlamaConfig, model_for
from kvjax.models.deepseek import DeepSeekConfig
from kvjax.states.cache import model_cache
from kvjax.testing import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_line, decode_runs  # noqa: E402

VOCAB = 1024


def random_lm(cfg, seed: int = 0) -> kvjax.LM:
    tokens = np.zeros((1, 4), np.int32)
    params = model_for(cfg)(cfg).init(jax.random.key(seed), tokens, tokens, model_cache(cfg, 1, 16))["params"]
    flat = {k: v * 0.5 for k, v in traverse_util.flatten_dict(params, sep="/").items()}  # milder activations
    return kvjax.LM(cfg, traverse_util.unflatten_dict(flat, sep="/"), tiny_tokenizer(), name=type(cfg).__name__)


def interleaved(models: dict, ids, new_tokens: int, repeats: int) -> dict:
    """`bench_common.decode_runs` over several models: one compile run each, then `repeats` rounds
    taking every model in turn (noise of a shared machine hits them alike)."""
    first = {name: decode_runs(lm, ids, {name: {}}, new_tokens, 0)[name] for name, lm in models.items()}
    for _ in range(repeats):
        for name, lm in models.items():
            r = lm.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
            first[name].tok_s.append((len(r.ids) - 1) / r.decode_s)
    return first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    top = max(args.contexts) + args.new_tokens + 64
    mla = DeepSeekConfig(vocab_size=VOCAB, d_model=2048, n_layers=args.layers, n_heads=16, d_ff=512, kv_lora_rank=512,
                         qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_positions=top)
    dense = LlamaConfig(vocab_size=VOCAB, d_model=2048, n_layers=args.layers, n_heads=16, n_kv_heads=16, head_dim=128,
                        d_ff=512, max_positions=top)
    models = {"mla absorbed": random_lm(mla), "dense MHA": random_lm(dense)}
    models["mla expanded"] = kvjax.LM(mla.replace(mla_absorb="never"), models["mla absorbed"].params,
                                      models["mla absorbed"].tokenizer)
    lines = [f"float32, {args.layers} layers, {args.new_tokens} new tokens, {args.repeats} interleaved rounds; "
             f"{cpu_line()}", "",
             "| context | cache | cache bytes / layer | decode ms/token best (spread) | vs dense |",
             "|---|---|---|---|---|"]
    for n in args.contexts:
        ids = np.random.default_rng(n).integers(0, VOCAB, n).tolist()
        runs = interleaved(models, ids, args.new_tokens, args.repeats)
        base = 1000 / runs["dense MHA"].best
        for name, r in runs.items():
            ms = 1000 / r.best
            lines.append(f"| {n} | {name} | {r.bytes // args.layers:,} | {ms:.1f} "
                         f"({1000 / max(r.tok_s):.1f}-{1000 / min(r.tok_s):.1f}) | {ms / base:.2f}x |")
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
