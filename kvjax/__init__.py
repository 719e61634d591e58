"""kvjax: a JAX research framework for KV-cache compression in LLMs.

    import kvjax
    lm = kvjax.load("smollm2-135m")
    out = lm.generate("The capital of France is", max_new_tokens=16)
    kvjax.cache_nbytes(out.cache)
"""
from kvjax.hub import DEFAULT_MODEL, KNOWN_MODELS
from kvjax.states import DenseKV, KVCache, cache_nbytes, init_cache, kept_positions
from kvjax.lm import LM, Generation, load
from kvjax import methods, quantizers
from kvjax.states import QuantKV, memory_report
from kvjax.calibrate import calibrate_kvquant

__all__ = ["load", "LM", "Generation", "DenseKV", "QuantKV", "KVCache", "cache_nbytes", "memory_report", "init_cache",
           "kept_positions", "calibrate_kvquant",
           "DEFAULT_MODEL", "KNOWN_MODELS"]
__version__ = "0.1.0"
