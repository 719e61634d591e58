"""Weight names of the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) in Hugging Face and GGUF checkpoints.

kvjax keys are the flat paths of `Llama`'s Flax params ("layers_{i}/attn/q_proj/kernel"); the generic
conversion (`kvjax.weights`) reads these maps through the family registry (`kvjax.models.family`).
"""
from __future__ import annotations

from kvjax.models.config import LlamaConfig
from kvjax.models.family import WeightNames

HF_LAYER = {  # HF suffix after "model.layers.{i}." -> (kvjax path after "layers_{i}/", transpose)
    "self_attn.q_proj.weight": ("attn/q_proj/kernel", True),
    "self_attn.k_proj.weight": ("attn/k_proj/kernel", True),
    "self_attn.v_proj.weight": ("attn/v_proj/kernel", True),
    "self_attn.o_proj.weight": ("attn/o_proj/kernel", True),
    "self_attn.q_proj.bias": ("attn/q_proj/bias", False),
    "self_attn.k_proj.bias": ("attn/k_proj/bias", False),
    "self_attn.v_proj.bias": ("attn/v_proj/bias", False),
    "self_attn.q_norm.weight": ("attn/q_norm/scale", False),
    "self_attn.k_norm.weight": ("attn/k_norm/scale", False),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", True),
    "input_layernorm.weight": ("attn_norm/scale", False),
    "post_attention_layernorm.weight": ("mlp_norm/scale", False),
}
QK_NORM = ("attn/q_norm/scale", "attn/k_norm/scale")  # Qwen3's per-head q/k RMSNorm
HF_TOP = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),
}
GGUF_LAYER = {  # GGUF suffix after "blk.{i}." -> HF suffix after "model.layers.{i}."
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}
GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def expected_keys(cfg: LlamaConfig) -> set[str]:
    keys = {"embed/embedding", "final_norm/scale"} | ({"lm_head/kernel"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layers):
        for path, _ in HF_LAYER.values():
            if (path.endswith("bias") and not cfg.qkv_bias) or (path in QK_NORM and not cfg.qk_norm):
                continue
            keys.add(f"layers_{i}/{path}")
    return keys


def gguf_permuted(arch: str, suffix: str, cfg: LlamaConfig) -> int | None:
    """llama.cpp permutes the q/k rows of the `llama` architecture (not `qwen2`) for its interleaved RoPE."""
    if arch == "llama" and suffix.startswith("attn_q."):
        return cfg.n_heads
    if arch == "llama" and suffix.startswith("attn_k."):
        return cfg.n_kv_heads
    return None


def redundant(cfg: LlamaConfig) -> frozenset[str]:
    """A tied model ignores a checkpoint's lm_head."""
    return frozenset({"lm_head/kernel"}) if cfg.tie_embeddings else frozenset()


WEIGHTS = WeightNames(
    hf_top=HF_TOP, hf_layer=HF_LAYER, gguf_top=GGUF_TOP, gguf_layer=GGUF_LAYER, expected_keys=expected_keys,
    hf_ignored=("rotary_emb.inv_freq",),  # a buffer old HF checkpoints carry
    gguf_ignored=("rope_freqs.weight",),  # Llama 3.1+ RoPE scaling factors: read into the config
    gguf_permuted=gguf_permuted, redundant=redundant,
)
