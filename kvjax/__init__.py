"""kvjax: a JAX research framework for KV-cache compression in LLMs.

    import kvjax
    lm = kvjax.load("smollm2-135m")
    out = lm.generate("The capital of France is", max_new_tokens=16)
    kvjax.cache_nbytes(out.cache)

Your own method: `@kvjax.register_method("name")` on a frozen dataclass subclassing
`kvjax.methods.ScoreMethod` (quantizers: `@kvjax.register_quantizer`); the CLI imports it with
`--import FILE`.
"""
from kvjax import interrupt

interrupt.install_if_program()  # the `kvjax` command: Ctrl-C while it imports exits 130, no traceback

from kvjax.hub import DEFAULT_MODEL, KNOWN_MODELS
from kvjax.states import DenseKV, KVCache, cache_nbytes, init_cache, kept_positions
from kvjax.lm import LM, Generation, load
from kvjax import methods, plugins, quantizers
from kvjax.methods import register_method, register_quantizer
from kvjax.states import QuantKV, memory_report
from kvjax.calibrate import calibrate_kvquant

__all__ = ["load", "LM", "Generation", "DenseKV", "QuantKV", "KVCache", "cache_nbytes", "memory_report", "init_cache",
           "kept_positions", "calibrate_kvquant", "methods", "quantizers", "plugins", "register_method",
           "register_quantizer",
           "DEFAULT_MODEL", "KNOWN_MODELS"]
__version__ = "0.1.0"
