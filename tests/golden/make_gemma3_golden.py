r"""Write golden reference outputs of Gemma 3 270M (the `gemma3-270m` GGUF), computed with Hugging Face
transformers and the `sentencepiece` library.

Not run in CI: the outputs are committed under tests/golden/gemma3-270m/ and the tests only read them.
To regenerate (CPU only, deterministic, a few minutes on 2 cores):

    pip install torch==2.13.0 transformers gguf accelerate sentencepiece protobuf
    python tests/golden/make_gemma3_golden.py [--gguf PATH] [--out DIR]

Model: `Gemma3ForCausalLM.from_pretrained(..., gguf_file=)`, float32, eager attention (transformers
subtracts the 1 llama.cpp added to every norm weight). The script checks the loaded config first
(18 layers, 4 heads / 1 KV head, head_dim 256, every 6th layer global, window 512, RoPE bases 1e6 / 1e4,
query_pre_attn_scalar 256, no soft-caps, tied embeddings).

Prompts are ids, not text: transformers' GGUF tokenizer conversion for this model is wrong (it splits
" capital" into letters). The ids come from the `sentencepiece` library on a model file built from the
GGUF's own vocabulary (pieces, scores, types; BPE, byte fallback, identity normalization, no dummy
prefix, as the GGUF's metadata says), with BOS (id 2) in front.

Files written to --out:
  <name>.npz              ids int32 [T]; last_logits float32 [V] (the logits at the last position, one
                          forward over the whole prompt, no cache); argmax int32 [T] (at every position);
                          greedy16 int32 [16] (model.generate, greedy, never stopping at EOS);
                          gap float32 [T] (top-1 minus top-2 logit at every position: how near a tie)
  tokenizer_cases.json    [{"text", "ids"}]: `sentencepiece` ids (no BOS) of varied texts, the last one
                          the essay's first 8000 characters
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from gguf import GGUFReader
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import Gemma3ForCausalLM

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
REPO = Path(__file__).resolve().parents[2]
ESSAY = REPO.parent / "shared" / "data" / "paul_graham_essays" / "worked.txt"

TEXT_CASES = [
    "The capital of France is", "Hello, world!", "Year 2024: 12345 apples", "3.14159", "1,000,000",
    "Call 555-0199 or +1 (800) 123-4567 before 10:30pm.", "x2 = a1b22c333; v0.1.2-rc3",
    "café naïve résumé Zürich façade", "日本語のテキストと中文字符", "Emoji: 🚀🔥👍🏽 and 👨‍👩‍👧",
    "مرحبا بالعالم", "Привет, мир! Ελληνικά", "¹²³ ½ ٣٤٥ 一二三", "हिन्दी और বাংলা", "한국어 텍스트",
    "def f(x):\n    return x * 2\n", "if a:\n\tb = 1\n\t\tc = 2\r\n", "a  b   c    d     e",
    "line1\n\nline2\n\n\n", "   leading spaces", "trailing spaces   ", " ", "\n", "\t\t",
    "don't I'll we're they've she'd it's", "DON'T I'LL",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "https://www.example.com/path?query=1&x=2#frag", "user@example.com",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "<b>bold</b> &amp; <i>x</i>",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++", "SELECT * FROM t WHERE x >= 10;",
    "\u200b zero\u00a0width and nbsp", "Ω≈ç√∫˜µ≤≥÷ ∀x∈ℝ", "\U0001f600" * 3 + "\x00\x07",
]


def default_gguf() -> Path:
    for d in filter(None, [os.environ.get("KVJAX_CACHE"), "~/.cache/kvjax"]):
        if (p := Path(d).expanduser() / "gemma3-270m" / GGUF_NAME).is_file():
            return p
    raise SystemExit(f"{GGUF_NAME} not found; run `kvjax.hub.fetch('gemma3-270m')` or pass --gguf")


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def sentencepiece_model(gguf: Path) -> spm.SentencePieceProcessor:
    """A SentencePiece BPE model of the GGUF's vocabulary (what llama.cpp's converter read)."""
    reader = GGUFReader(str(gguf))
    tokens, scores, types = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    m.trainer_spec.bos_id = field(reader, "tokenizer.ggml.bos_token_id")
    m.trainer_spec.eos_id = field(reader, "tokenizer.ggml.eos_token_id")
    m.trainer_spec.pad_id = field(reader, "tokenizer.ggml.padding_token_id")
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix"))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, ty
    with tempfile.NamedTemporaryFile(suffix=".model", delete=False) as f:
        f.write(m.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=f.name)
    os.unlink(f.name)
    return sp


def write_tokenizer_cases(sp: spm.SentencePieceProcessor, texts: list[str], out: Path) -> None:
    cases = [{"text": t, "ids": sp.encode(t)} for t in texts]
    (out / "tokenizer_cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=0))


def check_model(model) -> None:
    c = model.config
    facts = dict(layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                 head_dim=c.head_dim, window=c.sliding_window, qpas=c.query_pre_attn_scalar,
                 softcap=c.final_logit_softcapping, attn_softcap=c.attn_logit_softcapping,
                 rope=c.rope_parameters, globals=[i for i, t in enumerate(c.layer_types) if t == "full_attention"])
    print("config:", facts)
    assert (facts["layers"], facts["heads"], facts["kv_heads"], facts["head_dim"]) == (18, 4, 1, 256)
    assert facts["globals"] == [5, 11, 17] and facts["window"] == 512 and facts["qpas"] == 256
    assert facts["softcap"] is None and facts["attn_softcap"] is None
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "lm_head not tied"


def top2_gap(logits: torch.Tensor) -> np.ndarray:
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).numpy().astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "gemma3-270m")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sp = sentencepiece_model(gguf)
    essay = ESSAY.read_text(encoding="utf-8")
    write_tokenizer_cases(sp, TEXT_CASES + [essay[:8000]], args.out)

    model = Gemma3ForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    check_model(model)
    bos = model.config.bos_token_id
    prompts = {"short": [bos] + sp.encode("The capital of France is"),
               "long700": ([bos] + sp.encode(essay))[:700]}
    for name, ids in prompts.items():
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].float()
            greedy = model.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):]
        np.savez_compressed(args.out / f"{name}.npz", ids=np.array(ids, np.int32),
                            last_logits=logits[-1].numpy().astype(np.float32),
                            argmax=logits.argmax(-1).numpy().astype(np.int32),
                            greedy16=greedy.numpy().astype(np.int32), gap=top2_gap(logits))
        print(name, len(ids), "greedy:", greedy.tolist(), "smallest gap:", top2_gap(logits).min())


if __name__ == "__main__":
    main()
