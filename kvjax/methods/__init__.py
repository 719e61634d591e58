"""KV-cache compression methods: one small frozen dataclass per method, in one registry of three kinds.

* score methods (`ScoreMethod`, kind "score"): `score(ctx) -> [B, K, S]` over a finished prefill;
* prefill methods (`PrefillMethod`, kind "prefill"): build their own cache while prefilling (Locret,
  MatryoshkaKV);
* quantizers (`kvjax.quantizers.Quantizer`, kind "quantizer"): store what is kept quantized.

    kvjax.methods.get("snapkv")                  # by registered name, default hyper-parameters
    kvjax.methods.get("adakv:snapkv")            # a wrapper around a scorer
    kvjax.methods.get("snapkv(window=16)")       # hyper-parameters in the name (CLI, eval configs)
    kvjax.methods.get("locret(checkpoint=runs/locret)")
    kvjax.methods.get("kivi-2")                  # a quantizer
    kvjax.methods.get("compose(snapkv(window=16), kivi-2)")   # a token method, then a quantizer
    kvjax.methods.SnapKV(window=32, reduce="sum")  # or an object
    kvjax.methods.split(spec)                    # -> (token method or None, quantizer or None)

User plugins: `@kvjax.register_method("name")` on a frozen dataclass subclassing `ScoreMethod` (or
`PrefillMethod`), `@kvjax.register_quantizer("name")` on a `Quantizer`; `--import FILE` on the CLI.
"""
import importlib
import pkgutil

from kvjax.methods.adakv import AdaKV
from kvjax.methods.base import (KINDS, WRAPPERS, Budget, EvictionMethod, PrefillMethod, ScoreContext, ScoreMethod,
                                lookup, register, register_method, register_quantizer, registry, unregister)
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
from kvjax.methods.spec import Compose, get, kind_of, parse_call, spec_of, split

WRAPPERS["adakv"] = AdaKV

# every method module of this package registers itself on import: a new method is one file here
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["get", "split", "spec_of", "kind_of", "Compose", "KINDS", "AdaKV", "WRAPPERS", "Budget", "EvictionMethod",
           "ScoreMethod", "PrefillMethod", "ScoreContext", "register", "register_method", "register_quantizer",
           "unregister", "registry", "lookup", "ExpectedAttention", "Knorm", "Locret", "Matryoshka",
           "ObservedAttention", "PyramidKV", "Random", "SnapKV", "StreamingLLM", "TOVA"]
