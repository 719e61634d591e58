"""Checkpoint loading: tiny random HF directories (Llama, Qwen2, sharded) and GGUF files, written here,
loaded with `kvjax.load`, and compared with the independent numpy Llama in `numpy_llama.py`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from gguf import GGMLQuantizationType, quants
from numpy_llama import hf_inv_freq, forward
from safetensors.numpy import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers

import kvjax
import kvjax.hub
from kvjax.gguf_io import unpermute_qk
from kvjax.testing import tiny_tokenizer, tiny_tokenizer_metadata

ATOL = 1e-4
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
HF_VOCAB = len(ALPHABET) + len(MERGES) + 1  # bytes, merges, <|im_end|>

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": HF_VOCAB, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False,
    # llama3 scaling with a short original context, so all three frequency regimes occur at head_dim 8:
    # wavelengths 2 pi * (1, 10, 100, 1000) against the thresholds 64 / 4 = 16 and 64 / 1 = 64
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": HF_VOCAB, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
    "intermediate_size": 48, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}


# ----------------------------------------------------------------------------- writing checkpoints
def random_hf_weights(hf: dict, seed: int, bias: bool = False) -> dict[str, np.ndarray]:
    """HF-named float32 tensors, linear weights [out, in], scaled so logits have a clear spread."""
    rng = np.random.default_rng(seed)
    e, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    n_h, n_kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    d = hf.get("head_dim") or e // n_h

    def mat(out, inp):
        return (rng.normal(size=(out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1 + 0.2 * rng.normal(size=n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.normal(size=(v, e)).astype(np.float32), "model.norm.weight": norm(e)}
    if not hf.get("tie_word_embeddings"):
        w["lm_head.weight"] = mat(v, e)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(n_h * d, e)
        w[p + "self_attn.k_proj.weight"] = mat(n_kv * d, e)
        w[p + "self_attn.v_proj.weight"] = mat(n_kv * d, e)
        w[p + "self_attn.o_proj.weight"] = mat(e, n_h * d)
        if bias:
            for name, n in (("q", n_h * d), ("k", n_kv * d), ("v", n_kv * d)):
                w[p + f"self_attn.{name}_proj.bias"] = (0.5 * rng.normal(size=n)).astype(np.float32)
        w[p + "mlp.gate_proj.weight"] = mat(f, e)
        w[p + "mlp.up_proj.weight"] = mat(f, e)
        w[p + "mlp.down_proj.weight"] = mat(e, f)
        w[p + "input_layernorm.weight"] = norm(e)
        w[p + "post_attention_layernorm.weight"] = norm(e)
    return w


def write_hf_tokenizer(path: Path) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(ALPHABET + ["".join(m) for m in MERGES])}
    tk = tokenizers.Tokenizer(models.BPE(vocab, MERGES))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    assert tk.get_vocab_size() == HF_VOCAB
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    return tk


def write_hf_dir(path: Path, hf: dict, weights: dict, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    write_hf_tokenizer(path)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"))
        return path
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: q/k rows reordered for llama.cpp's interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight"}
QUANTIZED = {"self_attn.v_proj.weight": GGMLQuantizationType.Q8_0, "mlp.up_proj.weight": GGMLQuantizationType.Q4_1}


def write_gguf(path: Path, hf: dict, weights: dict, skip: tuple[str, ...] = (),
               rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A llama-architecture GGUF as llama.cpp's converter writes it; returns the HF weights it holds
    (after quantization round-trips, for the tensors stored quantized). `rope_freqs`: the per-frequency
    divisors llama.cpp stores for Llama 3.1+ RoPE scaling."""
    tok = tiny_tokenizer_metadata()
    n_h, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(n_h)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok["tokenizer.chat_template"])
    held = {}
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, arr in weights.items():
        if name in skip:
            continue
        if name in GGUF_NAMES:
            gname, suffix = GGUF_NAMES[name], ""
        else:
            i, _, suffix = name[len("model.layers."):].partition(".")
            gname = f"blk.{i}.{GGUF_LAYER[suffix]}"
        stored = arr
        if suffix == "self_attn.q_proj.weight":
            stored = llama_cpp_permute(arr, n_h)
        elif suffix == "self_attn.k_proj.weight":
            stored = llama_cpp_permute(arr, n_kv)
        if suffix in QUANTIZED:
            qtype = QUANTIZED[suffix]
            w.add_tensor(gname, quants.quantize(stored, qtype), raw_dtype=qtype)
            held[name] = quants.dequantize(quants.quantize(arr, qtype), qtype)  # rows quantize alone
        else:
            w.add_tensor(gname, stored)
            held[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def greedy_numpy(weights, hf, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(forward(weights, hf, seq)[-1])))
    return seq[len(prompt):]


# ------------------------------------------------------------------------------------ HF directory
def test_llama_hf_dir(tmp_path):
    weights = random_hf_weights(LLAMA, seed=0)
    lm = kvjax.load(str(write_hf_dir(tmp_path / "llama", LLAMA, weights)))
    assert lm.cfg.rope_scaling == ("llama3", 4.0, 1.0, 4.0, 64) and not lm.cfg.tie_embeddings
    assert lm.params["lm_head"]["kernel"].shape == (32, HF_VOCAB)  # [in, out]
    ids = prompt_ids(40, 1, HF_VOCAB)  # positions up to 39: RoPE far from the identity
    np.testing.assert_allclose(lm.logits(ids), forward(weights, LLAMA, ids), atol=ATOL, rtol=0)
    # batch of different lengths, each row against the reference
    rows = [ids[:9], ids]
    batch = lm.logits(rows)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(batch[i, : len(r)], forward(weights, LLAMA, r), atol=ATOL, rtol=0)
    # decoding through the while_loop and the cache agrees with the numpy model's greedy choice
    out = lm.generate(ids[:12], max_new_tokens=6, stop_at_eos=False)
    assert out.ids == greedy_numpy(weights, LLAMA, ids[:12], 6)
    # the tokenizer comes from tokenizer.json / tokenizer_config.json
    assert lm.tokenizer.eos_ids == (HF_VOCAB - 1,)
    hf_tok = tokenizers.Tokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    assert lm.encode("hello world<|im_end|>") == hf_tok.encode("hello world<|im_end|>").ids
    assert lm.encode("hello")[0] == hf_tok.token_to_id("hell")


def test_qwen2_hf_dir_with_bias_tied_and_wide_heads(tmp_path):
    weights = random_hf_weights(QWEN2, seed=2, bias=True)
    lm = kvjax.load(str(write_hf_dir(tmp_path / "qwen2", QWEN2, weights)))
    cfg = lm.cfg
    assert cfg.qkv_bias and cfg.tie_embeddings and (cfg.head_dim, cfg.n_kv_heads) == (16, 1)
    assert "lm_head" not in lm.params and lm.params["layers_1"]["attn"]["k_proj"]["bias"].shape == (16,)
    ids = prompt_ids(33, 3, HF_VOCAB)
    np.testing.assert_allclose(lm.logits(ids), forward(weights, QWEN2, ids), atol=ATOL, rtol=0)


def test_sharded_hf_dir(tmp_path):
    weights = random_hf_weights(LLAMA, seed=4)
    path = write_hf_dir(tmp_path / "sharded", LLAMA, weights, shards=3)
    (path / "stray.safetensors").write_bytes(b"not listed in the index, never read")
    lm = kvjax.load(str(path))
    ids = prompt_ids(21, 5, HF_VOCAB)
    np.testing.assert_allclose(lm.logits(ids), forward(weights, LLAMA, ids), atol=ATOL, rtol=0)


def test_hf_dir_dtype_and_errors(tmp_path):
    weights = random_hf_weights(LLAMA, seed=6)
    path = write_hf_dir(tmp_path / "m", LLAMA, weights)
    lm = kvjax.load(str(path), dtype="bfloat16")
    assert lm.cfg.dtype == "bfloat16" and lm.params["embed"]["embedding"].dtype == np.dtype("bfloat16")

    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers_1/mlp/up_proj"):
        kvjax.load(str(path))

    save_file({**weights, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)},
              str(path / "model.safetensors"))  # old HF checkpoints carry this buffer: ignored
    kvjax.load(str(path))
    save_file({**weights, "model.extra.weight": np.ones(4, np.float32)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.extra.weight"):
        kvjax.load(str(path))

    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        kvjax.load(str(path))
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        kvjax.load(str(path))


# -------------------------------------------------------------------------------------------- GGUF
def test_permute_is_inverse_of_unpermute_qk():
    # head_dim 4: llama.cpp interleaves the two rotate-half halves, HF rows [0, 1, 2, 3] -> [0, 2, 1, 3]
    rows = np.arange(8, dtype=np.float32)[:, None]  # 2 heads of dim 4, one column
    np.testing.assert_array_equal(llama_cpp_permute(rows, 2)[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])
    w = np.random.default_rng(0).normal(size=(6 * 8, 5)).astype(np.float32)
    for n_head in (1, 2, 6):
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
        np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head), w)


GGUF_HF = {**LLAMA, "vocab_size": len(tiny_tokenizer_metadata()["tokenizer.ggml.tokens"]),
           "tie_word_embeddings": True, "rope_scaling": None, "rope_theta": 50000.0}


def test_gguf_load_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
    weights = random_hf_weights(GGUF_HF, seed=7)
    path = tmp_path / "tiny.gguf"
    held = write_gguf(path, GGUF_HF, weights)
    lm = kvjax.load(str(path))
    assert lm.cfg.tie_embeddings and (lm.cfg.n_heads, lm.cfg.n_kv_heads) == (4, 2)
    assert lm.cfg.rope_theta == 50000.0 and lm.cfg.vocab_size == GGUF_HF["vocab_size"]
    ids = prompt_ids(40, 8, GGUF_HF["vocab_size"])
    expected = forward(held, GGUF_HF, ids)
    np.testing.assert_allclose(lm.logits(ids), expected, atol=ATOL, rtol=0)
    # the tokenizer comes from the GGUF metadata
    assert lm.tokenizer.eos_ids == (2,) and lm.encode("hello world") == tiny_tokenizer().encode("hello world")

    converted = list((tmp_path / "cache" / "converted").glob("*/params.safetensors"))
    assert len(converted) == 1
    mtime = converted[0].stat().st_mtime_ns

    def no_reconversion(*a, **k):
        raise AssertionError("the GGUF was read again instead of the converted cache")

    with monkeypatch.context() as m:
        m.setattr(kvjax.hub, "open_gguf", no_reconversion)
        again = kvjax.load(str(path))
    assert converted[0].stat().st_mtime_ns == mtime
    np.testing.assert_allclose(again.logits(ids), expected, atol=ATOL, rtol=0)

    # a changed file (new size / mtime) is converted again
    weights2 = random_hf_weights(GGUF_HF, seed=9)
    held2 = write_gguf(path, GGUF_HF, weights2)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    changed = kvjax.load(str(path))
    assert len(list((tmp_path / "cache" / "converted").glob("*/params.safetensors"))) == 2
    np.testing.assert_allclose(changed.logits(ids), forward(held2, GGUF_HF, ids), atol=ATOL, rtol=0)


def test_gguf_untied_output(tmp_path, monkeypatch):
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
    hf = {**GGUF_HF, "tie_word_embeddings": False}
    weights = random_hf_weights(hf, seed=10)
    path = tmp_path / "untied.gguf"
    held = write_gguf(path, hf, weights)
    lm = kvjax.load(str(path))
    assert not lm.cfg.tie_embeddings
    ids = prompt_ids(17, 11, hf["vocab_size"])
    np.testing.assert_allclose(lm.logits(ids), forward(held, hf, ids), atol=ATOL, rtol=0)


def test_gguf_rope_freqs_applies_llama3_scaling(tmp_path, monkeypatch):
    """llama.cpp keeps Llama 3.1 RoPE scaling only as the `rope_freqs` tensor (inv_freq / factors)."""
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = {**GGUF_HF, "rope_scaling": scaling}
    d = hf["hidden_size"] // hf["num_attention_heads"]
    factors = hf_inv_freq(d, hf["rope_theta"]) / hf_inv_freq(d, hf["rope_theta"], scaling)
    assert factors.max() > 1.5  # the scaling really changes some frequencies
    weights = random_hf_weights(hf, seed=12)
    path = tmp_path / "llama31.gguf"
    held = write_gguf(path, hf, weights, rope_freqs=factors)
    lm = kvjax.load(str(path))
    assert lm.cfg.rope_scaling[0] == "freq_factors"
    ids = prompt_ids(60, 13, hf["vocab_size"])
    np.testing.assert_allclose(lm.logits(ids), forward(held, hf, ids), atol=ATOL, rtol=0)


def test_corrupt_gguf_raises_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
    weights = random_hf_weights(GGUF_HF, seed=12)
    good = tmp_path / "good.gguf"
    write_gguf(good, GGUF_HF, weights)
    data = good.read_bytes()
    for name, content in [("truncated.gguf", data[: len(data) // 2]), ("header_only.gguf", data[:40]),
                          ("short_by_ten.gguf", data[:-10]), ("not_gguf.gguf", b"PK\x03\x04" + data[4:])]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            kvjax.load(str(bad))
    # a well-formed file that lacks a tensor
    partial = tmp_path / "partial.gguf"
    write_gguf(partial, GGUF_HF, weights, skip=("model.layers.1.self_attn.o_proj.weight",))
    with pytest.raises(ValueError, match="partial.gguf"):
        kvjax.load(str(partial))
