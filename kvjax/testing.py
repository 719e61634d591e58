"""Tiny random models for tests and examples: no download, compiles in about a second on CPU.

    lm = kvjax.testing.tiny_lm(seed=0)          # 2 layers, d_model 32, 4 heads / 2 KV heads x 8
    lm.generate("hello", max_new_tokens=8)

The tokenizer is a real byte-level BPE (`Tokenizer.from_gguf_metadata`, pre-tokenizer "smollm"):
three control tokens, the 256 byte characters and a few merges, with `<|im_end|>` as end of sequence.
The model's vocabulary is exactly the tokenizer's, so every generated id decodes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tokenizers import pre_tokenizers

from kvjax.states.cache import model_cache
from kvjax.lm import LM
from kvjax.models.config import LlamaConfig
from kvjax.models.family import model_for
from kvjax.tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
EOS_ID = 2  # <|im_end|>


def tiny_tokenizer_metadata(eos_id: int = EOS_ID) -> dict:
    """GGUF-style tokenizer metadata of the tiny byte-level BPE (ids: specials, bytes, merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = list(SPECIAL_TOKENS) + alphabet + merged
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIAL_TOKENS) + [1] * (len(alphabet) + len(merged)),
        "tokenizer.ggml.merges": list(MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": eos_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


TINY_VOCAB = len(SPECIAL_TOKENS) + 256 + len(MERGES)


def tiny_tokenizer(eos_id: int = EOS_ID) -> Tokenizer:
    """The tiny byte-level BPE; `eos_id` picks which id ends a sequence (default `<|im_end|>`)."""
    return Tokenizer.from_gguf_metadata(tiny_tokenizer_metadata(eos_id))


def tiny_config(**overrides) -> LlamaConfig:
    """2 layers, d_model 32, 4 query heads / 2 KV heads of dim 8, vocab of the tiny tokenizer, float32."""
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      d_ff=64, rms_eps=1e-5, rope_theta=10000.0, max_positions=256, tie_embeddings=False,
                      dtype="float32")
    return cfg.replace(**overrides)


def tiny_params(cfg: LlamaConfig, seed: int = 0, scale: float = 1.0) -> dict:
    """Random params of `model_for(cfg)(cfg)`: Flax's default initializers, then two changes.

    The embedding is drawn with unit variance (times `scale`), so logits have a clear spread and greedy
    decoding has no near-ties that float rounding could flip; norm scales are 1 + 0.2 N(0, 1), so a
    missing or misplaced scale shows up.
    """
    key_init, key_embed, key_norm = jax.random.split(jax.random.key(seed), 3)
    cache = model_cache(cfg, 1, 16)
    tokens = jnp.zeros((1, 1), jnp.int32)
    flat = traverse_util.flatten_dict(model_for(cfg)(cfg).init(key_init, tokens, tokens, cache)["params"])
    for i, path in enumerate(sorted(flat)):
        if path[-1] == "scale":
            flat[path] = 1.0 + 0.2 * jax.random.normal(jax.random.fold_in(key_norm, i), flat[path].shape,
                                                       cfg.jnp_dtype)
    emb = ("embed", "embedding")
    flat[emb] = scale * jax.random.normal(key_embed, flat[emb].shape, cfg.jnp_dtype)
    return traverse_util.unflatten_dict(flat)


def tiny_lm(seed: int = 0, eos_id: int = EOS_ID, **config_overrides) -> LM:
    """A tiny random `LM` with the tiny tokenizer (vocab sizes match)."""
    cfg = tiny_config(**config_overrides)
    if cfg.vocab_size != TINY_VOCAB:
        raise ValueError(f"tiny_lm's tokenizer has {TINY_VOCAB} tokens; vocab_size must match")
    return LM(cfg, tiny_params(cfg, seed), tiny_tokenizer(eos_id), name=f"tiny-{seed}")


def random_ids(n: int, seed: int, vocab: int = TINY_VOCAB) -> np.ndarray:
    """n token ids drawn uniformly from [0, vocab) (reproducible)."""
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int32)
