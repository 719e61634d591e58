r"""The passkey sweep of `kvjax eval passkey`, run by NVIDIA kvpress 0.5.5 on the same prompts, timed.

    python experiments/passkey_prompts.py --lengths 1024 2048 4096 --n 10 --out /tmp/passkey_prompts.json
    /work/goldvenv/bin/python experiments/kvpress_passkey_sweep.py --prompts /tmp/passkey_prompts.json \
        --out experiments/results/eval/kvpress_passkey.csv [--n 3]

Needs torch, transformers, gguf and kvpress 0.5.5 (installed as tests/golden/make_kvpress_reference.py
says; that script's `make_press` gives the presses with kvpress's defaults, and its compatibility shim
passes `cache_position` to the prefill). For every prompt and every (press, ratio), as kvpress's
`KVPressTextGenerationPipeline._forward` does: prefill the context ids with the press's hooks (one
prefill per press: kvpress compresses inside the forward pass), then feed the suffix ids (question,
assistant header, answer prefix) at positions T, T+1, ... and decode greedily (`generate_answer`:
10 tokens, stop on EOS). The token ids are the ones kvjax builds, so both tools see the same prompts.
With PyramidKV (layers of different lengths) the suffix is fed one token at a time: transformers 5.23
builds a multi-token mask from layer 0's length, which does not fit the other layers. AdaKV and KVzip
only mask evicted keys (`masked_key_indices`), cleared before every prompt.
Writes one CSV row per prompt x configuration and prints the wall time of the sweep (model loading
excluded) and a table of passkey accuracy per press and ratio.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "golden"))
from make_kvpress_reference import default_gguf, make_press  # noqa: E402  (imports kvpress)

import kvpress  # noqa: E402
from kvpress.presses import kvzip_press  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

PRESSES = {  # kvjax method name -> make_kvpress_reference press name
    "streaming_llm": "streaming_llm", "snapkv": "snapkv", "pyramidkv": "pyramidkv", "tova": "tova",
    "knorm": "knorm", "observed_attention": "observed_attention", "expected_attention": "expected_attention",
    "adakv:snapkv": "adakv_snapkv", "kvzip": "kvzip"}


@torch.no_grad()
def answer(model, context: list[int], suffix: list[int], press, max_new_tokens: int, eos: int) -> list[int]:
    """kvpress's pipeline `_forward` + `generate_answer` for one question, on token ids."""
    for layer in model.model.layers:  # masks a masking press (AdaKV, KVzip) left from the previous prompt
        layer.self_attn.masked_key_indices = None
    ids = torch.tensor([context])
    cache = DynamicCache(config=model.config)
    kw = dict(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]))
    if press is None:
        model.model(**kw)
    else:
        with press(model):
            model.model(**kw)
    t = ids.shape[1]
    q = torch.tensor([suffix])
    pos = torch.arange(t, t + q.shape[1]).unsqueeze(0)
    if len({cache.get_seq_length(i) for i in range(len(cache))}) == 1:
        out = model(input_ids=q, past_key_values=cache, position_ids=pos, num_logits_to_keep=1)
    else:  # per-layer budgets (PyramidKV): transformers 5.23 sizes a multi-token mask by layer 0 only
        for i in range(q.shape[1]):
            out = model(input_ids=q[:, i:i + 1], past_key_values=cache, position_ids=pos[:, i:i + 1])
    pos = pos[:, -1:] + 1
    new = [out.logits[0, -1].argmax()]
    for i in range(max_new_tokens - 1):
        out = model(input_ids=new[-1].view(1, 1), past_key_values=cache, position_ids=pos + i)
        new.append(out.logits[0, -1].argmax())
        if int(new[-1]) == eos:
            break
    return [int(x) for x in new]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--methods", nargs="+", default=["full"] + list(PRESSES))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--n", type=int, default=None, help="only the first N prompts of each length")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = args.gguf or default_gguf()
    data = json.loads(args.prompts.read_text())
    models = {impl: AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    decode = Tokenizer.from_str(tok.backend_tokenizer.to_str()).decode
    # KVzipPress loads its tokenizer (chat template) by model.config.name_or_path, the GGUF's folder here
    kvzip_press.AutoTokenizer = type("GGUFTokenizer", (), {"from_pretrained": staticmethod(lambda *a, **k: tok)})
    eos = 2  # <|im_end|>
    configs = [(m, r) for m in args.methods for r in ([None] if m == "full" else args.ratios)]
    rows = []
    t0 = time.perf_counter()
    samples = [s for s in data["samples"] if args.n is None or s["sample"] < args.n]
    for s in samples:
        for method, ratio in configs:
            press, impl = (None, "sdpa") if method == "full" else make_press(PRESSES[method], ratio)
            t = time.perf_counter()
            ids = answer(models[impl], s["context"], s["suffix"], press, s["max_new_tokens"], eos)
            text = decode(ids, skip_special_tokens=True)
            rows.append(dict(length=s["length"], sample=s["sample"], method=method, ratio=ratio, answer=text,
                             expected=s["answer"], correct=int(s["answer"] in text), seconds=time.perf_counter() - t))
        print(f"length {s['length']} sample {s['sample']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    total = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    acc = defaultdict(list)
    for r in rows:
        acc[r["method"], r["ratio"]].append(r["correct"])
    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}, torch "
          f"{torch.__version__}, {args.threads} threads: {len(rows)} answers in {total:.0f} s")
    print("| method | ratio | passkey % |\n|---|---|---|")
    for (m, r), v in acc.items():
        print(f"| {m} | {r if r is not None else '-'} | {100 * sum(v) / len(v):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
