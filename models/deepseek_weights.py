"""Weight names of the DeepSeek-V2/V3 family in Hugging Face checkpoints (DeepSeek-V2-Lite layout).

kvjax keys are the flat paths of `DeepSeek`'s Flax params. Routed experts are stored stacked,
`layers_{i}/moe/experts_{gate,up,down}_proj` [X, in, out], for grouped matmuls: `regroup` stacks
DeepSeek's per-expert tensors (`mlp.experts.{e}.gate_proj.weight` [out, in], what `save_pretrained`
writes) and splits transformers 5's fused in-memory form (`mlp.experts.gate_up_proj` [X, 2I, E],
`mlp.experts.down_proj` [X, E, I]) before the generic renaming (`kvjax.weights.hf_to_flat`).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

from kvjax.models.deepseek import DeepSeekConfig
from kvjax.models.family import WeightNames

HF_LAYER = {  # HF suffix after "model.layers.{i}." -> (kvjax path after "layers_{i}/", transpose)
    "self_attn.q_proj.weight": ("attn/q_proj/kernel", True),
    "self_attn.q_a_proj.weight": ("attn/q_a_proj/kernel", True),
    "self_attn.q_a_proj.bias": ("attn/q_a_proj/bias", False),
    "self_attn.q_a_layernorm.weight": ("attn/q_a_layernorm/scale", False),
    "self_attn.q_b_proj.weight": ("attn/q_b_proj/kernel", True),
    "self_attn.kv_a_proj_with_mqa.weight": ("attn/kv_a_proj_with_mqa/kernel", True),
    "self_attn.kv_a_proj_with_mqa.bias": ("attn/kv_a_proj_with_mqa/bias", False),
    "self_attn.kv_a_layernorm.weight": ("attn/kv_a_layernorm/scale", False),
    "self_attn.kv_b_proj.weight": ("attn/kv_b_proj", True),
    "self_attn.o_proj.weight": ("attn/o_proj/kernel", True),
    "self_attn.o_proj.bias": ("attn/o_proj/bias", False),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", True),
    "mlp.gate.weight": ("moe/gate", True),
    "mlp.shared_experts.gate_proj.weight": ("moe/shared/gate_proj/kernel", True),
    "mlp.shared_experts.up_proj.weight": ("moe/shared/up_proj/kernel", True),
    "mlp.shared_experts.down_proj.weight": ("moe/shared/down_proj/kernel", True),
    # stacked by `regroup`, already [X, in, out]
    "mlp.experts.gate_proj": ("moe/experts_gate_proj", False),
    "mlp.experts.up_proj": ("moe/experts_up_proj", False),
    "mlp.experts.down_proj": ("moe/experts_down_proj", False),
    "input_layernorm.weight": ("attn_norm/scale", False),
    "post_attention_layernorm.weight": ("mlp_norm/scale", False),
}
HF_TOP = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),
}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def regroup(cfg: DeepSeekConfig, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Per-expert (or fused) expert tensors -> one stacked [X, in, out] tensor per layer and projection
    (yielded when a layer's X experts are all read); every other tensor passes through."""
    pending: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, arr in tensors:
        m = _EXPERT.fullmatch(name)
        if m is None:
            fused = _FUSED.fullmatch(name)
            if fused is None:
                yield name, arr
                continue
            layer, kind = fused.groups()
            prefix = f"model.layers.{layer}.mlp.experts."
            if kind == "gate_up_proj":  # [X, 2I, E]: gate rows first (transformers' chunk(2))
                gate, up = np.split(arr, 2, axis=1)
                yield prefix + "gate_proj", np.ascontiguousarray(gate.transpose(0, 2, 1))
                yield prefix + "up_proj", np.ascontiguousarray(up.transpose(0, 2, 1))
            else:  # [X, E, I]
                yield prefix + "down_proj", np.ascontiguousarray(arr.transpose(0, 2, 1))
            continue
        layer, expert, proj = m.groups()
        group = pending.setdefault((layer, proj), {})
        group[int(expert)] = arr
        if len(group) == cfg.n_routed_experts:
            if sorted(group) != list(range(cfg.n_routed_experts)):
                raise ValueError(f"layer {layer}: experts {sorted(group)} do not number 0..{cfg.n_routed_experts - 1}")
            yield (f"model.layers.{layer}.mlp.experts.{proj}",
                   np.stack([group[e].T for e in range(cfg.n_routed_experts)]))
            del pending[(layer, proj)]
    if pending:
        (layer, proj), got = next(iter(pending.items()))
        raise ValueError(f"layer {layer}: {len(got)} of {cfg.n_routed_experts} experts' {proj} in the checkpoint")


def expected_keys(cfg: DeepSeekConfig) -> set[str]:
    keys = {"embed/embedding", "final_norm/scale"} | ({"lm_head/kernel"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layers):
        writes = cfg.writes_latent(i)  # a CLLA consumer has no down-projection (it reads its producer's latent)
        attn = ["attn/kv_b_proj", "attn/o_proj/kernel"] + (["attn/kv_a_proj_with_mqa/kernel"] if writes else [])
        attn += ["attn/kv_a_layernorm/scale"] if cfg.latent_norm and writes else []
        attn += (["attn/q_proj/kernel"] if cfg.q_lora_rank is None else
                 ["attn/q_a_proj/kernel", "attn/q_a_layernorm/scale", "attn/q_b_proj/kernel"])
        if cfg.attention_bias:
            attn += ["attn/o_proj/bias"] + (["attn/kv_a_proj_with_mqa/bias"] if writes else [])
            attn += ["attn/q_a_proj/bias"] if cfg.q_lora_rank is not None else []
        if cfg.is_moe(i):
            mlp = ["moe/gate", "moe/experts_gate_proj", "moe/experts_up_proj", "moe/experts_down_proj"]
            mlp += [f"moe/shared/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")] if cfg.n_shared_experts else []
        else:
            mlp = [f"mlp/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")]
        keys |= {f"layers_{i}/{k}" for k in attn + mlp + ["attn_norm/scale", "mlp_norm/scale"]}
    return keys


def redundant(cfg: DeepSeekConfig) -> frozenset[str]:
    return frozenset({"lm_head/kernel"}) if cfg.tie_embeddings else frozenset()


WEIGHTS = WeightNames(
    hf_top=HF_TOP, hf_layer=HF_LAYER, gguf_top={}, gguf_layer={}, expected_keys=expected_keys,
    hf_ignored=("rotary_emb.inv_freq",), redundant=redundant, hf_regroup=regroup,
)
