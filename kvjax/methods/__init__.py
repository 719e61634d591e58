"""KV-cache compression methods: one small frozen dataclass per method, in one registry.

    kvjax.methods.get("snapkv")                  # by registered name, default hyper-parameters
    kvjax.methods.get("adakv:snapkv")            # a wrapper around a scorer
    kvjax.methods.SnapKV(window=32, reduce="sum")  # or an object
"""
from kvjax.methods.adakv import AdaKV
from kvjax.methods.base import Budget, EvictionMethod, ScoreContext, lookup, register, registry
from kvjax.methods.expected_attention import ExpectedAttention
from kvjax.methods.knorm import Knorm
from kvjax.methods.locret import Locret
from kvjax.methods.observed_attention import ObservedAttention
from kvjax.methods.pyramidkv import PyramidKV
from kvjax.methods.random import Random
from kvjax.methods.snapkv import SnapKV
from kvjax.methods.streaming_llm import StreamingLLM
from kvjax.methods.tova import TOVA

WRAPPERS: dict[str, type] = {"adakv": AdaKV}


def get(spec) -> EvictionMethod:
    """A method from an object, a registered name ("snapkv") or "wrapper:scorer" ("adakv:snapkv")."""
    if isinstance(spec, EvictionMethod):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"method must be a name or a method object, got {type(spec).__name__}")
    wrapper, _, inner = spec.partition(":")
    if inner:
        if wrapper not in WRAPPERS:
            raise ValueError(f"unknown wrapper {wrapper!r}; known wrappers: {', '.join(sorted(WRAPPERS)) or 'none'}")
        return WRAPPERS[wrapper](press=get(inner))
    if spec in WRAPPERS:
        raise ValueError(f"{spec!r} wraps another method: write it as '{spec}:<method>', e.g. '{spec}:snapkv'")
    return lookup(spec)()


__all__ = ["get", "AdaKV", "WRAPPERS", "Budget", "EvictionMethod", "ScoreContext", "register", "registry", "ExpectedAttention", "Knorm", "Locret",
           "ObservedAttention", "PyramidKV", "Random", "SnapKV", "StreamingLLM", "TOVA"]
