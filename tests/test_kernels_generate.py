"""`attention_impl="pallas"` end to end: the same greedy tokens as the jnp path for every state type."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kvjax import methods, quantizers, testing
from kvjax.cli import main
from kvjax.kernels import dispatch
from kvjax.states import LatentKV

CASES = {
    "dense": {},
    "kivi-2": dict(quant=quantizers.KIVI(bits=2, group=16, residual=32)),
    "per_token-4": dict(quant=quantizers.PerToken(bits=4, group=16, residual=32)),
    "int8": dict(quant="int8"),
    "adakv (ragged)": dict(method=methods.AdaKV(methods.SnapKV(window=4)), ratio=0.5),
    "h2o (column sums)": dict(method="observed_attention", ratio=0.5),
    "snapkv (window attention)": dict(method=methods.SnapKV(window=8), ratio=0.5),
    "tova (window attention)": dict(method="tova", ratio=0.5),
    "streaming (rolling)": dict(method="streaming_llm", capacity=24),
}


@pytest.fixture(scope="module")
def lm():
    return testing.tiny_lm(head_dim=32, n_heads=6, n_kv_heads=2)  # G = 3


@pytest.fixture(scope="module")
def rows():
    return [testing.random_ids(45, 1).tolist(), testing.random_ids(30, 2).tolist()]  # different lengths


@pytest.mark.parametrize("name", list(CASES))
def test_same_greedy_tokens(lm, rows, name):
    run = lambda impl: lm.generate(rows, max_new_tokens=12, stop_at_eos=False, attention_impl=impl,  # noqa: E731
                                   **CASES[name]).ids
    assert run("pallas") == run("xla")


@pytest.mark.parametrize("name", ["kivi-2", "adakv (ragged)"])
def test_question_on_top_of_a_compressed_cache(lm, rows, name):
    # several tokens at once over a quantized / ragged state: the kernels' causal (T > 1) path
    question = [testing.random_ids(5, 3).tolist(), testing.random_ids(7, 4).tolist()]
    run = lambda impl: lm.generate(question, cache=lm.prefill(rows, attention_impl=impl, **CASES[name]),  # noqa: E731
                                   max_new_tokens=6, stop_at_eos=False, attention_impl=impl).ids
    assert run("pallas") == run("xla")


def test_impl_choice():
    assert dispatch.resolve_impl("xla") == "xla" and dispatch.resolve_impl("pallas") == "pallas"
    assert dispatch.resolve_impl(None) == ("xla" if jax.default_backend() == "cpu" else "auto")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dispatch.resolve_impl("triton")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--attention-impl", "triton"])
    assert e.value.code == 2


def test_state_without_kernel_names_the_fallback():
    state = LatentKV.init(1, 4, jnp.zeros((1, 64, 8)), jnp.zeros((1, 64, 8)), jnp.float32)
    with pytest.raises(ValueError, match=r'no Pallas kernel for a LatentKV layer state.*attention_impl="xla"'):
        state.attend(jnp.zeros((1, 1, 2, 64)), jnp.zeros((1, 1), jnp.int32), impl="pallas")


@pytest.mark.parametrize("quant", [quantizers.KVQuant(bits=3, group=16, residual=32), "int8"])
def test_auto_uses_jnp_where_a_layout_has_no_kernel(lm, rows, quant):
    # kvquant (sink, outliers, 3-bit) has no kernel: "pallas" refuses it, "auto" falls back per layer;
    # int8 with adakv is a quantized per-head pool (QuantRaggedKV), which has no kernel either
    kw = dict(quant=quant) if not isinstance(quant, str) else dict(quant=quant, **CASES["adakv (ragged)"])
    run = lambda impl: lm.generate(rows, max_new_tokens=8, stop_at_eos=False, attention_impl=impl, **kw).ids  # noqa: E731
    assert run("auto") == run("xla")
    with pytest.raises(ValueError, match='attention_impl="xla"'):
        run("pallas")


def test_window_scorers_use_the_kernel():
    """SnapKV / TOVA window attention under "pallas" is the kernel's (same values as jnp); a head dim
    the kernel refuses raises under "pallas" and falls back to jnp under "auto"."""
    import dataclasses

    import numpy as np
    from test_methods import make_ctx, make_obs

    from kvjax.methods.window import window_attention

    rng = np.random.default_rng(0)
    for d in (32, 24):  # 24 is not a power of two: no kernel
        b, n_kv, g, s, w = 2, 2, 3, 64, 5
        obs = make_obs(b, n_kv * g, d, q_win=rng.normal(size=(b, w, n_kv * g, d)),
                       win_pos=np.array([[35, 36, 37, 38, 39], [55, 56, 57, 58, 59]]))
        ctx = make_ctx(rng.normal(size=(b, n_kv, s, d)), [40, 60], g, obs=obs)
        ref = window_attention(ctx, w)
        with_impl = lambda impl: window_attention(dataclasses.replace(ctx, attention_impl=impl), w)  # noqa: E731
        np.testing.assert_allclose(with_impl("auto"), ref, atol=2e-5)
        if d == 32:
            np.testing.assert_allclose(with_impl("pallas"), ref, atol=2e-5)
        else:
            with pytest.raises(ValueError, match=r'head dim 24 .*attention_impl="xla"'):
                with_impl("pallas")
