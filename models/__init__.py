"""Functional Flax transformers for kvjax."""
from kvjax.models.config import LlamaConfig, rope_inv_freq
from kvjax.models.llama import Llama

__all__ = ["LlamaConfig", "Llama", "rope_inv_freq"]
