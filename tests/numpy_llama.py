"""An independent float64 numpy Llama, written from Hugging Face `modeling_llama.py` (transformers 4.4x),
for tests: it reads HF tensor names and [out, in] weights, so it shares no code with kvjax.

    logits = forward(weights, hf_config, ids)        # ids [T] -> logits [T, V]

Covers Llama / Mistral / Qwen2: embedding, RMSNorm (weight * x / rms), rotate-half RoPE with the
default / linear / llama3 inverse frequencies, GQA causal attention (`repeat_kv` order), SwiGLU MLP,
optional q/k/v biases, tied or untied LM head.
"""
from __future__ import annotations

import math

import numpy as np


def hf_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> np.ndarray:
    """`ROPE_INIT_FUNCTIONS[...]` of transformers' `modeling_rope_utils.py`, in float32 like torch."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    kind = None if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":  # _compute_linear_scaling_rope_parameters: inv_freq /= factor
        return (inv_freq / np.float32(rope_scaling["factor"])).astype(np.float32)
    if kind == "llama3":  # _compute_llama3_parameters, line by line
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama).astype(np.float32)
    raise ValueError(f"unknown rope scaling {kind!r}")


def rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x):
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, inv_freq):  # x [T, N, D], positions [T]
    freqs = positions[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)  # [T, D/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, D]
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(w: dict, hf: dict, ids, share=None) -> np.ndarray:
    """Logits [T, V] (float64) of token ids [T] at positions 0..T-1, from HF-named weights.

    `share` (cross-layer sharing, e.g. CLA): share[i] = share[j] with j < i makes layer i attend to the
    keys and values layer j (the first with that entry) computed, instead of its own."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    ids = np.asarray(ids)
    n_h, e = hf["num_attention_heads"], hf["hidden_size"]
    n_kv = hf.get("num_key_value_heads") or n_h
    d = hf.get("head_dim") or e // n_h
    eps = hf.get("rms_norm_eps", 1e-6)
    inv_freq = hf_inv_freq(d, hf.get("rope_theta", 10000.0), hf.get("rope_scaling"))
    t = len(ids)
    pos = np.arange(t)
    causal = np.tril(np.ones((t, t), bool))

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][ids]  # [T, E]
    produced = {}  # share entry -> (k, v) of the layer that computed them
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(h, p + "self_attn.q_proj").reshape(t, n_h, d)
        k = linear(h, p + "self_attn.k_proj").reshape(t, n_kv, d)
        v = linear(h, p + "self_attn.v_proj").reshape(t, n_kv, d)
        q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
        if share is not None:
            k, v = produced.setdefault(share[i], (k, v))
        k, v = np.repeat(k, n_h // n_kv, axis=1), np.repeat(v, n_h // n_kv, axis=1)  # repeat_kv
        scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(d)
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(t, n_h * d)
        x = x + linear(attn, p + "self_attn.o_proj")
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + linear(silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if hf.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T
