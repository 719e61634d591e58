"""KV-cache compression methods: one small frozen dataclass per method, in one registry.

    kvjax.methods.get("snapkv")                  # by registered name, default hyper-parameters
    kvjax.methods.get("adakv:snapkv")            # a wrapper around a scorer
    kvjax.methods.get("snapkv(window=16)")       # hyper-parameters in the name (CLI, eval configs)
    kvjax.methods.get("locret(checkpoint=runs/locret)")
    kvjax.methods.SnapKV(window=32, reduce="sum")  # or an object
"""
import ast
import dataclasses

from kvjax.methods.adakv import AdaKV
from kvjax.methods.base import Budget, EvictionMethod, ScoreContext, lookup, register, registry
from kvjax.methods.expected_attention import ExpectedAttention
from kvjax.methods.knorm import Knorm
from kvjax.methods.locret import Locret
from kvjax.methods.matryoshka import Matryoshka
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
    name, kwargs = _parse_call(spec)
    cls = lookup(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        fields = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
        raise ValueError(f"bad parameters for {name!r} ({e}); its parameters: {fields}") from None


def _parse_call(spec: str) -> tuple[str, dict]:
    """"name" -> (name, {}); "name(a=1, b=x)" -> (name, {"a": 1, "b": "x"}) (Python literals, else strings)."""
    if "(" not in spec:
        return spec, {}
    name, _, body = spec.partition("(")
    if not body.endswith(")"):
        raise ValueError(f"method spec {spec!r}: expected name(key=value, ...)")
    kwargs = {}
    for item in filter(None, (s.strip() for s in body[:-1].split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method spec {spec!r}: {item!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name.strip(), kwargs


__all__ = ["get", "AdaKV", "WRAPPERS", "Budget", "EvictionMethod", "ScoreContext", "register", "registry", "ExpectedAttention", "Knorm", "Locret", "Matryoshka",
           "ObservedAttention", "PyramidKV", "Random", "SnapKV", "StreamingLLM", "TOVA"]
