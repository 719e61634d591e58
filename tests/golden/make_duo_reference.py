"""Golden head scores of kvpress 0.5.5's DuoAttention on-the-fly ranking (`duo_attention_on_the_fly`), for
given mean queries and keys: the lines of its per-layer loop after the means, run with transformers'
Llama RoPE, so `kvjax.methods.duo.on_the_fly_scores` is checked against kvpress's arithmetic.

    /work/refvenv/bin/python tests/golden/make_duo_reference.py    # writes tests/golden/duo/on_the_fly.npz
"""
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

H, K, D, Q_LEN, THETA = 4, 2, 8, 500, 10000.0
rng = np.random.default_rng(0)
mu_q = rng.normal(size=(H, D)).astype(np.float32)  # mean pre-RoPE query per query head
mu_k = rng.normal(size=(K, D)).astype(np.float32)  # mean pre-RoPE key per KV head
config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=K, head_dim=D, rope_theta=THETA,
                     max_position_embeddings=1024)
rotary = LlamaRotaryEmbedding(config)
position_ids = torch.arange(Q_LEN).unsqueeze(0)
# kvpress duo_attention_on_the_fly, from "Mean query" on (q, k: [1, heads, q_len, D])
q = torch.tensor(mu_q)[None, None].repeat(1, Q_LEN, 1, 1).transpose(1, 2)
k = torch.tensor(mu_k)[None, None].repeat(1, Q_LEN, 1, 1).transpose(1, 2)
cos, sin = rotary(q, position_ids)
q, k = apply_rotary_pos_emb(q, k, cos, sin)
k = k.repeat_interleave(H // K, dim=1)
attn_weights = torch.matmul(q[:, :, -1:, :], k.transpose(2, 3)) / (D ** 0.5)
attn_weights = attn_weights.softmax(dim=-1, dtype=torch.float32).squeeze()
s = torch.cumsum(attn_weights, dim=1).mean(1)
s = s.view(-1, H // K).mean(1)
out = Path(__file__).parent / "duo" / "on_the_fly.npz"
np.savez(out, mu_q=mu_q, mu_k=mu_k, scores=s.numpy(), q_len=Q_LEN, theta=THETA)
print(out, s.numpy())
