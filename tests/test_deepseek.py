"""The DeepSeek-V2 family (MLA + DeepSeekMoE) against transformers' `DeepseekV2ForCausalLM`, and the
`MLAKV` latent state it decodes with (absorbed vs expanded, eviction, quantization, bytes).

Golden directories come from `tests/golden/make_deepseek_golden.py` (tiny random configs saved with
`save_pretrained`, float32 logits and greedy continuations from transformers 5.25); nothing here
needs torch. Configs: `plain` (plain q projection, default RoPE, dense + greedy MoE layers) and
`qlora_yarn` (q-LoRA, YaRN with mscale != mscale_all_dim, group-limited routing, 2 shared experts).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import generation, pipeline
from kvjax.models import deepseek_weights
from kvjax.models.deepseek import DeepSeekConfig, route, rope_params
from kvjax.states import MLAKV, cache_nbytes
from kvjax.states.cache import model_cache

GOLDEN = Path(__file__).parent / "golden" / "deepseek-tiny"
CONFIGS = ("plain", "qlora_yarn")
ATOL = 1e-4  # float32 logits vs transformers (measured: <= 6e-6)


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer files: tested below
        lm = kvjax.load(str(GOLDEN / name), dtype="float32")
    return name, lm, np.load(GOLDEN / name / "golden.npz")


@pytest.fixture(scope="module", params=CONFIGS)
def model(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def one():
    """The richer config (q-LoRA, YaRN, group-limited MoE), for the state-level tests."""
    return _load("qlora_yarn")


@pytest.mark.parametrize("prompt", ["short", "long"])
def test_logits_and_greedy_tokens_equal_transformers(model, prompt):
    name, lm, golden = model
    ids = golden[f"ids_{prompt}"]
    logits = lm.logits(ids[None])[0]
    np.testing.assert_allclose(logits, golden[f"logits_{prompt}"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), golden[f"logits_{prompt}"].argmax(-1))
    out = lm.generate(ids.tolist(), max_new_tokens=16, stop_at_eos=False)
    assert out.ids == golden[f"greedy_{prompt}"].tolist()


def test_config_reads_what_the_checkpoints_set(model):
    name, lm, _ = model
    cfg = lm.cfg
    assert isinstance(cfg, DeepSeekConfig) and cfg.kv_lora_rank == 16 and cfg.qk_rope_head_dim == 8
    if name == "plain":
        assert cfg.q_lora_rank is None and cfg.rope_scaling is None and cfg.topk_method == "greedy"
        assert [cfg.is_moe(i) for i in range(cfg.n_layers)] == [False, True, True]
    else:
        assert cfg.q_lora_rank == 12 and cfg.rope_scaling[0] == "yarn" and cfg.topk_method == "group_limited_greedy"
        inv, factor, scale = rope_params(cfg)
        # YaRN: attention factor mscale(4, 1) / mscale(4, 0.5), softmax scale times mscale(4, 0.5)^2
        m = lambda s, x: 0.1 * x * np.log(s) + 1  # noqa: E731
        assert factor == pytest.approx(m(4, 1.0) / m(4, 0.5))
        assert scale == pytest.approx(16 ** -0.5 * m(4, 0.5) ** 2)


def test_absorbed_and_expanded_decode_agree(one):
    """Decode steps in the absorbed form (W^UK in the query, W^UV on the latent output) and in the
    expanded form (per-head K/V up-projected from the cached latents) give the same logits."""
    name, lm, golden = one
    ids = golden["ids_long"].tolist()
    outs = {}
    for mode in ("never", "always"):  # "decode" (absorbed at T = 1 only) is what the golden test runs
        cfg = dataclasses.replace(lm.cfg, mla_absorb=mode)
        cache = model_cache(cfg, 1, 128)
        logits, cache, _ = generation.prefill(lm.params, cfg, np.asarray([ids]), np.asarray([len(ids)]), cache)
        steps = [np.asarray(logits)]
        for tok in golden["greedy_long"][:4]:  # teacher-forced decode steps (T = 1) through the cache
            logits, cache, _ = generation.prefill(lm.params, cfg, np.asarray([[tok]]), np.asarray([1]), cache)
            steps.append(np.asarray(logits))
        outs[mode] = np.stack(steps)
    np.testing.assert_allclose(outs["always"], outs["never"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(outs["always"][0, 0], golden["logits_long"][-1], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(outs["never"][:, 0].argmax(-1), golden["greedy_long"][:5])


def test_the_cache_holds_latents_and_rope_keys_only(one):
    """Bytes per token and layer: (d_c + P) numbers (+ the int32 position), whatever the head count."""
    name, lm, golden = one
    cfg = lm.cfg
    ids = golden["ids_long"].tolist()
    cache = lm.prefill(ids)
    assert all(isinstance(layer, MLAKV) for layer in cache.layers)
    s = cache.layers[0].capacity
    per_layer = s * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 + s * 4 + 4
    assert cache_nbytes(cache) == cfg.n_layers * per_layer + 4
    dense_equivalent = cfg.n_layers * s * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    assert cache_nbytes(cache) < dense_equivalent / 3


def test_latents_evicted_by_snapkv_and_quantized(one):
    """compose(snapkv, int8): half the latents kept (one KV head: the same tokens for every query
    head), stored int8; decoding on top still follows the full model's greedy start."""
    name, lm, golden = one
    ids = golden["ids_long"].tolist()
    evicted = lm.prefill(ids, method="snapkv(window=8)", ratio=0.5)
    assert int(evicted.layers[0].length[0]) == 50 and evicted.layers[0].capacity == 50
    h2o = lm.prefill(ids, method="h2o", ratio=0.5)  # column sums of the absorbed attention, with its lse
    assert int(h2o.layers[0].length[0]) == 50 and h2o.layers[0].capacity == 50
    quant = lm.prefill(ids, method="compose(snapkv(window=8), int8(residual=2))", ratio=0.5)
    assert isinstance(quant.layers[0], MLAKV) and cache_nbytes(quant) < 0.5 * cache_nbytes(evicted)
    assert type(quant.layers[0].store).__name__ == "QuantKV"
    out = lm.generate(ids, max_new_tokens=4, stop_at_eos=False, method="compose(snapkv(window=8), int8)", ratio=0.1)
    assert len(out.ids) == 4 and all(0 <= i < lm.cfg.vocab_size for i in out.ids)


def test_snapkv_scores_are_mla_attention(one):
    """The window attention SnapKV reads from an `MLAKV` (absorbed query against [c; k^R]) equals the
    softmax of the expanded per-head logits q_i . [W^UK_i c; k^R] * scale (a float64 reference)."""
    name, lm, golden = one
    cfg = lm.cfg
    ids = golden["ids_short"]
    t = len(ids)
    layer = lm.params["layers_0"]["attn"]
    cache = lm.prefill(ids.tolist())
    state = cache.layers[0]
    c = np.asarray(state.latent[0, 0, :t], np.float64)  # [T, R]
    kr = np.asarray(state.k_rope[0, 0, :t], np.float64)  # [T, P]
    # the model's queries of layer 0 for the prompt, recomputed in numpy from its params
    h_in = _normed_embeddings(lm, ids)
    n, p, r, heads = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.n_heads
    q = _queries(cfg, layer, h_in).reshape(t, heads, n + p)
    inv, factor, scale = rope_params(cfg)
    ang = np.arange(t)[:, None] * inv[None]
    qr = q[..., n:].reshape(t, heads, p // 2, 2)
    cos, sin = (np.cos(ang) * factor)[:, None], (np.sin(ang) * factor)[:, None]
    q_rope = np.stack([qr[..., 0] * cos - qr[..., 1] * sin, qr[..., 0] * sin + qr[..., 1] * cos], -1).reshape(t, heads, p)
    w = np.asarray(layer["kv_b_proj"], np.float64).reshape(r, heads, -1)[..., :n]
    keys = np.concatenate([np.einsum("sr,rhn->hsn", c, w), np.broadcast_to(kr, (heads, t, p))], -1)
    logits = np.einsum("thd,hsd->hts", np.concatenate([q[..., :n], q_rope], -1), keys) * scale
    logits = np.where(np.tril(np.ones((t, t), bool))[None], logits, -np.inf)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)  # [H, T, S]
    q_abs = np.concatenate([np.einsum("thn,rhn->thr", q[..., :n], w), q_rope], -1) * scale * np.sqrt(r + p)
    key_abs = np.asarray(state.k[0, 0, :t], np.float64)  # [c; k^R]
    got = np.einsum("thd,sd->hts", q_abs, key_abs) / np.sqrt(r + p)
    got = np.where(np.tril(np.ones((t, t), bool))[None], got, -np.inf)
    got = np.exp(got - got.max(-1, keepdims=True))
    got /= got.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def _normed_embeddings(lm, ids):
    e = np.asarray(lm.params["embed"]["embedding"], np.float64)[ids]
    return _rms(e, lm.params["layers_0"]["attn_norm"]["scale"], lm.cfg.rms_eps)


def _queries(cfg, layer, x):
    if cfg.q_lora_rank is None:
        return x @ np.asarray(layer["q_proj"]["kernel"], np.float64)
    cq = _rms(x @ np.asarray(layer["q_a_proj"]["kernel"], np.float64), layer["q_a_layernorm"]["scale"], cfg.rms_eps)
    return cq @ np.asarray(layer["q_b_proj"]["kernel"], np.float64)


def test_directory_without_tokenizer_loads_with_a_warning_and_works_on_ids():
    with pytest.warns(UserWarning, match="no tokenizer files"):
        lm = kvjax.load(str(GOLDEN / "plain"), dtype="float32")
    with pytest.raises(ValueError, match="give token ids"):
        lm.encode("hello")
    assert lm.decode([3, 5]) == "<3><5>"


def test_fused_and_per_expert_layouts_stack_alike():
    """transformers 5 holds experts fused ([X, 2I, E] gate_up, [X, E, I] down); DeepSeek's files hold one
    tensor per expert: both regroup to the same stacked [X, in, out]."""
    cfg = DeepSeekConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=1, d_ff=4, kv_lora_rank=2, qk_nope_head_dim=2,
                         qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=3, moe_d_ff=5, n_experts_per_tok=1)
    rng = np.random.default_rng(0)
    gate, up, down = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 4, 5))
    per = [(f"model.layers.0.mlp.experts.{e}.{n}.weight", w[e]) for e in (2, 0, 1)
           for n, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))]
    fused = [("model.layers.0.mlp.experts.gate_up_proj", np.concatenate([gate, up], 1)),
             ("model.layers.0.mlp.experts.down_proj", down)]
    a, b = dict(deepseek_weights.regroup(cfg, per)), dict(deepseek_weights.regroup(cfg, fused))
    assert a.keys() == b.keys() == {f"model.layers.0.mlp.experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a["model.layers.0.mlp.experts.gate_proj"], gate.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="2 of 3 experts"):
        list(deepseek_weights.regroup(cfg, per[:6]))


def test_routing_matches_a_hand_computed_case():
    """Group-limited greedy: 4 experts in 2 groups, top-1 group by its best expert, then top-2 inside."""
    cfg = DeepSeekConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=1, d_ff=4, kv_lora_rank=2, qk_nope_head_dim=2,
                         qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, moe_d_ff=2, n_experts_per_tok=2,
                         topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=2.0)
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.4, 0.3]]))  # softmax = these; group 1 (experts 2, 3) best: 0.4
    w, e = route(cfg, logits)
    assert sorted(np.asarray(e[0]).tolist()) == [2, 3]
    np.testing.assert_allclose(sorted(np.asarray(w[0]).tolist()), [0.6, 0.8], rtol=1e-6)  # x routed scaling 2
    greedy = dataclasses.replace(cfg, topk_method="greedy")
    assert sorted(np.asarray(route(greedy, logits)[1][0]).tolist()) == [2, 3]
    normed = dataclasses.replace(cfg, norm_topk_prob=True)
    np.testing.assert_allclose(sorted(np.asarray(route(normed, logits)[0][0]).tolist()), [2 * 3 / 7, 2 * 4 / 7],
                               rtol=1e-6)


@pytest.mark.parametrize("spec, kw", [("adakv:snapkv", dict(ratio=0.5)), ("think:snapkv", dict(ratio=0.5)),
                                      ("expected_attention", dict(ratio=0.5)), ("h2o", dict(capacity=64))])
def test_layouts_an_mla_cache_cannot_take_are_refused_before_compiling(one, spec, kw):
    name, lm, golden = one
    with pytest.raises(ValueError, match="does not apply to an MLA latent cache"):
        pipeline.plan(lm.cfg, [100], method=spec, **kw)  # what LM.prefill / generate validate first


# DeepSeek-V2-Lite's config.json (deepseek-ai/DeepSeek-V2-Lite), the older rope_scaling form
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
}


def test_deepseek_v2_lite_config_builds_the_checkpoints_parameters():
    """The real V2-Lite config: its module's parameters (shapes only, nothing allocated) are exactly the
    keys its checkpoint maps to, and its cache is 576 numbers per token and layer."""
    import flax.traverse_util
    from kvjax.models import config_from_hf, model_for
    cfg = config_from_hf(V2_LITE, dtype="bfloat16")
    assert cfg.rope_scaling[:3] == ("yarn", 40.0, 4096) and cfg.is_moe(1) and not cfg.is_moe(0)
    inv, factor, scale = rope_params(cfg)
    assert factor == pytest.approx(1.0) and scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2)
    small = dataclasses.replace(cfg, n_layers=3)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(lambda: model_for(small)(small).init(jax.random.key(0), tokens, tokens,
                                                                 model_cache(small, 1, 16)))["params"]
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    assert set(flat) == deepseek_weights.expected_keys(small)
    assert flat["layers_1/moe/experts_gate_proj"].shape == (64, 2048, 1408)
    assert flat["layers_0/attn/kv_b_proj"].shape == (512, 16 * (128 + 128))
    assert cfg.kv_bytes_per_token() == 27 * 576 * 2


def test_int4_latent_is_a_quantized_store(one):
    """An int4 latent: `quant=` stores c (and k^R) as 4-bit codes in the `QuantStore` of a `QuantKV`,
    no new class; the bytes drop below the float32 latents' and the next token is unchanged here."""
    name, lm, golden = one
    ids = golden["ids_long"].tolist()
    logits, full = lm.prefill(ids, return_logits=True)
    q_logits, quant = lm.prefill(ids, quant="per_token(bits=4, group=8, residual=8)", return_logits=True)
    store = quant.layers[0].store.store
    assert type(store).__name__ == "QuantStore" and store.vq.codes.shape[-1] == lm.cfg.kv_lora_rank // 2
    assert cache_nbytes(quant) < 0.5 * cache_nbytes(full)
    np.testing.assert_array_equal(np.asarray(q_logits), np.asarray(logits))  # prefill ran at full precision
    step = lm.generate(ids, max_new_tokens=2, stop_at_eos=False, quant="per_token(bits=4, group=8, residual=8)")
    assert step.ids[0] == golden["greedy_long"][0]
