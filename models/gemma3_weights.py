"""Weight names of the Gemma 3 family in Hugging Face and GGUF checkpoints.

kvjax keys are the flat paths of `Gemma3`'s Flax params ("layers_{i}/attn/q_norm/scale"); the generic
conversion (`kvjax.weights`) reads these maps through the family registry (`kvjax.models.family`).

llama.cpp's converter (`Gemma3Model.modify_tensors` in convert_hf_to_gguf.py) stores every RMSNorm
weight as 1 + w (Gemma's norm multiplies by 1 + w); transformers' GGUF loader subtracts the 1 again
(`Gemma2TensorProcessor`, used for gemma3). `gguf_value` does the same, in float32, so the params hold
HF's zero-centred w and `Gemma3`'s norm computes 1 + w exactly as transformers does.
"""
from __future__ import annotations

import numpy as np

from kvjax.models.family import WeightNames

HF_LAYER = {  # HF suffix after "model.layers.{i}." -> (kvjax path after "layers_{i}/", transpose)
    "self_attn.q_proj.weight": ("attn/q_proj/kernel", True),
    "self_attn.k_proj.weight": ("attn/k_proj/kernel", True),
    "self_attn.v_proj.weight": ("attn/v_proj/kernel", True),
    "self_attn.o_proj.weight": ("attn/o_proj/kernel", True),
    "self_attn.q_norm.weight": ("attn/q_norm/scale", False),
    "self_attn.k_norm.weight": ("attn/k_norm/scale", False),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", True),
    "input_layernorm.weight": ("attn_norm/scale", False),
    "post_attention_layernorm.weight": ("post_attn_norm/scale", False),
    "pre_feedforward_layernorm.weight": ("mlp_norm/scale", False),
    "post_feedforward_layernorm.weight": ("post_mlp_norm/scale", False),
}
HF_TOP = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),
}
GGUF_LAYER = {  # GGUF suffix after "blk.{i}." -> HF suffix after "model.layers.{i}."
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def expected_keys(cfg) -> set[str]:
    keys = {"embed/embedding", "final_norm/scale"} | ({"lm_head/kernel"} if not cfg.tie_embeddings else set())
    return keys | {f"layers_{i}/{path}" for i in range(cfg.n_layers) for path, _ in HF_LAYER.values()}


def gguf_value(hf_name: str, arr: np.ndarray) -> np.ndarray:
    """llama.cpp stores Gemma norm weights as 1 + w: back to w (float32, as transformers does)."""
    return arr - np.float32(1) if hf_name.endswith("norm.weight") else arr


def redundant(cfg) -> frozenset[str]:
    """A tied model ignores a checkpoint's lm_head."""
    return frozenset({"lm_head/kernel"}) if cfg.tie_embeddings else frozenset()


WEIGHTS = WeightNames(hf_top=HF_TOP, hf_layer=HF_LAYER, gguf_top=GGUF_TOP, gguf_layer=GGUF_LAYER,
                      expected_keys=expected_keys, redundant=redundant, gguf_value=gguf_value)
