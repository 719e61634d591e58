"""Golden logits of tiny random Qwen2 / Qwen3 / Mistral checkpoints from Hugging Face transformers.

Writes, per architecture, `tests/golden/families/NAME/` with `config.json`, the weights
(`model.safetensors`, sharded in two for Qwen3 with `model.safetensors.index.json`) and `golden.npz`:
`ids` (a 40-token prompt), `logits` (float32 [40, V] of the prompt), `prompt` / `greedy` (a 20-token
prompt and transformers' 12-token greedy continuation, which decodes past every sliding window).
The configs exercise what the Llama family must read from config.json: Qwen2's q/k/v biases, tied
embeddings and sliding window on the layers from `max_window_layers` on; Qwen3's per-head q/k RMSNorm and
explicit head_dim; Mistral's sliding window on every layer. tests/test_families_hf.py loads the folders
with `kvjax.load` (no torch there).

Run with transformers (the `golden` extra; used: torch 2.13 CPU, transformers 5.23.0):
    python tests/golden/make_families_golden.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent / "families"
VOCAB = 96
BASE = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "rms_norm_eps": 1e-6, "max_position_embeddings": 128}
CONFIGS = {
    "qwen2": {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_key_value_heads": 2,
              "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": True,
              "sliding_window": 6, "max_window_layers": 1},
    "qwen3": {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_key_value_heads": 1,
              "head_dim": 16, "rope_theta": 1000000.0, "tie_word_embeddings": False, "attention_bias": False,
              "use_sliding_window": False},
    "mistral": {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_key_value_heads": 2,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "sliding_window": 5},
}


def random_weights(hf: dict, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 tensors, linear weights [out, in] scaled by 1/sqrt(in), norms near 1."""
    rng = np.random.default_rng(seed)
    e, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    n_h, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    d = hf.get("head_dim") or e // n_h
    mat = lambda o, i: (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1 + 0.2 * rng.normal(size=n)).astype(np.float32)  # noqa: E731
    # a tied model's embeddings small beside the layers' outputs, or greedy decoding repeats the last token
    scale = 0.3 if hf["tie_word_embeddings"] else 1.0
    w = {"model.embed_tokens.weight": (scale * rng.normal(size=(v, e))).astype(np.float32),
         "model.norm.weight": norm(e)}
    if not hf["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(v, e)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q", n_h * d), ("k", n_kv * d), ("v", n_kv * d)):
            w[p + f"self_attn.{name}_proj.weight"] = mat(rows, e)
            if hf["model_type"] == "qwen2":
                w[p + f"self_attn.{name}_proj.bias"] = (0.5 * rng.normal(size=rows)).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = mat(e, n_h * d)
        if hf["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(d)
            w[p + "self_attn.k_norm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = mat(f, e)
        w[p + "mlp.up_proj.weight"] = mat(f, e)
        w[p + "mlp.down_proj.weight"] = mat(e, f)
        w[p + "input_layernorm.weight"] = norm(e)
        w[p + "post_attention_layernorm.weight"] = norm(e)
    return w


def write(name: str, hf: dict, seed: int) -> None:
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
    weights = random_weights(hf, seed)
    if name == "qwen3":  # the sharded layout real checkpoints use
        names, index = sorted(weights), {}
        for s in range(2):
            part = {n: weights[n] for n in names[s::2]}
            fname = f"model-{s + 1:05d}-of-00002.safetensors"
            save_file(part, str(folder / fname))
            index.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    else:
        save_file(weights, str(folder / "model.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    rng = np.random.default_rng(seed + 100)
    ids = rng.integers(0, VOCAB, size=40)
    prompt = ids[:20]
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].float().numpy()
        out = model.generate(torch.tensor(prompt)[None], max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    greedy = out[0, len(prompt):].numpy()
    np.savez(folder / "golden.npz", ids=ids.astype(np.int32), logits=logits.astype(np.float32),
             prompt=prompt.astype(np.int32), greedy=greedy.astype(np.int32))
    print(f"{name}: logits {logits.shape}, greedy {greedy.tolist()}")


if __name__ == "__main__":
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for i, (name, hf) in enumerate(CONFIGS.items()):
        write(name, hf, seed=20 + i)
