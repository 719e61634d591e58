"""Functional Flax transformers for kvjax, one module per model family, picked by `model_for(cfg)`.

    model = model_for(cfg)(cfg)                    # the family's Flax module for a config
    logits, cache = model.apply({"params": params}, tokens, positions, cache)

A family registers, in one `register_family` call below, its config class, its module, its weight
names (`WeightNames`, beside the module: `llama_weights.py`) and the architecture names of its
config.json / GGUF files (`kvjax.models.family`). Everything that builds a model, a config or a
checkpoint's params goes through the registry, so a new family is an addition, not an edit of the callers.
"""
from kvjax.models import gemma3, gemma3_weights, llama_weights
from kvjax.models.config import GGUF_ARCHITECTURES, HF_ARCHITECTURES, LlamaConfig
from kvjax.models.family import (Family, WeightNames, config_from_gguf, config_from_hf, families, family_named,
                                 family_of, model_for, register_family)
from kvjax.models.gemma3 import Gemma3, Gemma3Config
from kvjax.models.deepseek import DeepSeekConfig, DeepSeek
from kvjax.models import deepseek, deepseek_weights
from kvjax.models.llama import Llama
from kvjax.models.rope import apply_rope, rope_inv_freq

register_family(LlamaConfig, Llama, name="llama", weights=llama_weights.WEIGHTS,
                hf_architectures=HF_ARCHITECTURES, gguf_architectures=GGUF_ARCHITECTURES)
register_family(DeepSeekConfig, DeepSeek, name="deepseek", weights=deepseek_weights.WEIGHTS,
                hf_architectures=deepseek.HF_ARCHITECTURES)
register_family(Gemma3Config, Gemma3, name="gemma3", weights=gemma3_weights.WEIGHTS,
                hf_architectures=gemma3.HF_ARCHITECTURES, gguf_architectures=gemma3.GGUF_ARCHITECTURES)

__all__ = ["LlamaConfig", "Llama", "Gemma3Config", "Gemma3", "Family", "WeightNames", "model_for", "register_family", "family_of",
           "family_named", "families", "config_from_hf", "config_from_gguf", "apply_rope", "rope_inv_freq"]
