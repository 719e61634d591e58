"""Every registered score method x every state it can produce, through the one pipeline: dense top-k,
Ada-KV's per-head pool, decode-time eviction (`capacity=`, methods with a decode rule), and each of those
stored quantized (a `Compose` with a quantizer). Each case checks the state type the pipeline builds,
that `pipeline.abstract` predicts its bytes exactly, that it holds less than the full cache, and that it
generates. Prefill methods (trained) are covered by their own files (`test_methods.TRAINED`).
"""
from __future__ import annotations

import numpy as np
import pytest

import kvjax
from kvjax import methods, pipeline
from kvjax.states import DenseKV, QuantKV, QuantRaggedKV, RaggedKV, RollingKV, tree_nbytes
from kvjax.testing import random_ids, tiny_lm
from test_methods import METHOD_TABLE, TRAINED

LENGTH, CAPACITY, QUANT = 21, 16, "int8(residual=4)"  # a residual small against the prompt
FORMS = {  # form -> (method spec from a score method, extra arguments, state type of every layer)
    "dense": (lambda m: m, dict(ratio=0.5), DenseKV),
    "ragged": (lambda m: methods.AdaKV(press=m), dict(ratio=0.5), RaggedKV),
    "rolling": (lambda m: m, dict(capacity=CAPACITY), RollingKV),
    "dense+quant": (lambda m: methods.Compose(parts=(m, QUANT)), dict(ratio=0.5), QuantKV),
    "ragged+quant": (lambda m: methods.Compose(parts=(methods.AdaKV(press=m), QUANT)), dict(ratio=0.5),
                     QuantRaggedKV),
    "rolling+quant": (lambda m: methods.Compose(parts=(m, QUANT)), dict(capacity=CAPACITY), RollingKV),
}


def supports(method, form: str) -> bool:
    """Rolling forms need a decode rule; Ada-KV's pool wraps plain scorers only (FINCH selects its own)."""
    if "ragged" in form and not method.plain_scorer():
        return False
    return "rolling" not in form or method.decode_rule(CAPACITY) is not None


CASES = [(name, form) for name in sorted(METHOD_TABLE) for form in FORMS
         if supports(methods.registry()[name](**METHOD_TABLE[name][0]), form)]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=0)


def test_the_table_covers_every_method_and_form():
    assert set(METHOD_TABLE) | set(TRAINED) == set(methods.registry())
    forms = {f for _, f in CASES}
    assert forms == set(FORMS)
    assert {n for n, f in CASES if f == "rolling"} == {"observed_attention", "streaming_llm", "tova"}


@pytest.mark.parametrize("name,form", CASES)
def test_method_builds_its_state(lm, name, form):
    make, kw, state_type = FORMS[form]
    base = methods.registry()[name](**METHOD_TABLE[name][0])
    spec = make(base)
    ids = random_ids(LENGTH, 5).tolist()
    # `capacity=` bounds the cache while decoding (generate); with no new token it is the prompt's cache
    cache = lm.generate(ids, method=spec, max_new_tokens=0, **kw).cache if "capacity" in kw else \
        lm.prefill(ids, method=spec, **kw)
    assert all(type(s) is state_type for s in cache.layers), [type(s).__name__ for s in cache.layers]
    if form == "rolling+quant":
        assert all(s.quant is not None for s in cache.layers)
    plan = pipeline.plan(lm.cfg, [LENGTH], spec, **kw)
    assert kvjax.cache_nbytes(cache) == tree_nbytes(pipeline.abstract(lm.cfg, plan, LENGTH))
    assert kvjax.cache_nbytes(cache) < kvjax.cache_nbytes(lm.prefill(ids))
    out = lm.generate(ids, method=spec, max_new_tokens=4, stop_at_eos=False, **kw)
    assert len(out.ids) == 4 and all(0 <= t < lm.cfg.vocab_size for t in out.ids)
    # a method that re-rotates the kept keys (FINCH) continues at the kept count, as kvpress does
    seen = LENGTH
    if getattr(base, "rerotate", False) is True:
        seen = int(np.asarray(cache.layers[0].length)[0])  # tokens kept per head
        np.testing.assert_array_equal(cache.next_pos, [seen])
    np.testing.assert_array_equal(out.cache.next_pos, [seen + 4])
