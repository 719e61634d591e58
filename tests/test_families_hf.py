"""Qwen2, Qwen3 and Mistral checkpoints against Hugging Face transformers: tiny random HF folders in
`tests/golden/families/` (config.json, safetensors, sharded for Qwen3) with transformers' logits and greedy
continuations (`tests/golden/make_families_golden.py`). They cover what the Llama family reads from a
config.json beyond Llama: Qwen2's q/k/v biases, tied embeddings and sliding window on its upper layers,
Qwen3's per-head q/k RMSNorm, Mistral's sliding window on every layer (the prompts and continuations run
past every window)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvjax
from kvjax.models.config import LlamaConfig

GOLDEN = Path(__file__).resolve().parent / "golden" / "families"
ATOL = 1e-4  # float32 against float32 eager attention; max |diff| seen 4.2e-6


def _load(name: str):
    with pytest.warns(UserWarning, match="no tokenizer files"):
        return kvjax.load(str(GOLDEN / name), dtype="float32"), np.load(GOLDEN / name / "golden.npz")


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
def test_logits_and_greedy_match_transformers(name):
    lm, gold = _load(name)
    ids = gold["ids"].tolist()
    np.testing.assert_allclose(lm.logits([ids])[0], gold["logits"], atol=ATOL, rtol=0)
    prompt, n = gold["prompt"].tolist(), len(gold["greedy"])
    out = lm.generate(prompt, max_new_tokens=n, stop_at_eos=False)  # the jitted decode loop, past every window
    assert out.ids == gold["greedy"].tolist()
    # the prompt in two calls: the second chunk (13 tokens) meets a partly filled ring
    again = lm.generate(prompt[7:], cache=lm.prefill(prompt[:7]), max_new_tokens=n, stop_at_eos=False)
    assert again.ids == gold["greedy"].tolist()


def test_configs_read_from_config_json():
    qwen2, qwen3, mistral = (_load(n)[0].cfg for n in ("qwen2", "qwen3", "mistral"))
    assert qwen2.qkv_bias and qwen2.tie_embeddings and not qwen2.qk_norm
    assert qwen2.windows == (None, 6)  # max_window_layers 1: layer 0 global, layer 1 slides
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 16 and qwen3.windows is None
    assert mistral.windows == (5, 5) and not mistral.qk_norm
    cache = kvjax.init_cache(2, 1, 2, 64, 8, "float32", windows=mistral.windows)
    assert all(layer.sliding for layer in cache.layers)


def test_sliding_rules_of_config_json():
    base = {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 4, "num_attention_heads": 2,
            "intermediate_size": 8}
    mistral = {**base, "architectures": ["MistralForCausalLM"]}
    assert LlamaConfig.from_hf_config(mistral).windows == (4096,) * 4  # transformers' default window
    assert LlamaConfig.from_hf_config({**mistral, "sliding_window": None}).windows is None
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16}
    assert LlamaConfig.from_hf_config(qwen).windows is None  # use_sliding_window is off by default
    on = {**qwen, "use_sliding_window": True}
    assert LlamaConfig.from_hf_config(on).windows is None  # max_window_layers defaults to 28 > 4 layers
    assert LlamaConfig.from_hf_config({**on, "max_window_layers": 2}).windows == (None, None, 16, 16)
    types = ["sliding_attention", "full_attention"] * 2
    assert LlamaConfig.from_hf_config({**on, "layer_types": types}).windows == (16, None, 16, None)
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        LlamaConfig.from_hf_config({**on, "layer_types": types[:3]})
    with pytest.raises(ValueError, match="sliding_layers"):
        LlamaConfig.from_hf_config(mistral).replace(sliding_layers=(7,))


def test_eviction_compresses_the_global_layers_and_keeps_the_rings():
    lm, gold = _load("qwen2")  # layer 0 global, layer 1 a ring of 6
    ids = gold["ids"].tolist()
    cache = lm.prefill(ids, method="knorm", ratio=0.5)
    assert [p.shape for p in kvjax.kept_positions(cache)] == [(1, 2, 20), (1, 2, 6)]
    np.testing.assert_array_equal(kvjax.kept_positions(cache)[1][0, 0], np.arange(34, 40))
    report = kvjax.memory_report(cache)
    assert report["local_bytes"] == cache.layers[1].nbytes() and report["total"] == kvjax.cache_nbytes(cache)
