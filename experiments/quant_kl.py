"""KL divergence of next-token distributions under a quantized KV cache, against the full cache.

    python experiments/quant_kl.py [--context 2048] [--eval 64] [--quant int8 fp8 kivi-4 kivi-2 ...]
        [--calibration FILE] [--out experiments/results/quant_kl.md]

The first `--context` tokens of real text (Paul Graham essays) are prefilled and stored quantized;
the next `--eval` tokens are teacher-forced on top of that cache (they enter the residual and are
flushed into the quantized store as KIVI's streaming scheme does), and at each of them the
next-token distribution is compared with the full-precision cache's: KL(full || quantized), mean and
max over the evaluated positions, with the cache's effective bits per element.

A spec `kvquant-B-nuq` is KVQuant at B bits with non-uniform codebooks calibrated
(`kvjax.calibrate_kvquant`) on the first `--calib-tokens` tokens of `--calibration` (default:
WikiText-2 validation), a different text from the evaluated one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import kvjax
from kvjax import generation
from kvjax.shapes import bucket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import emit, prompt_ids  # noqa: E402

DEFAULT_QUANT = ["int8", "fp8", "per_token-8", "per_token-4", "kivi-4", "kvquant-4", "per_token-2", "kivi-2",
                 "kvquant-3", "kvquant-3-nuq", "kvquant-2", "kvquant-2-nuq"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def quantizer(lm, spec: str, calibration: Path, calib_tokens: int):
    """A quantizer from a spec; `kvquant-B-nuq` is calibrated on the calibration text."""
    if not spec.endswith("-nuq"):
        return kvjax.quantizers.get(spec)
    bits = int(spec.removesuffix("-nuq").rpartition("-")[2])
    ids = lm.encode(calibration.read_text(encoding="utf-8"))[:calib_tokens]
    return kvjax.calibrate_kvquant(lm, ids, bits=bits)


def continuation_logits(lm, context, continuation, quant):
    """log-softmax [M, V] at each continuation token, teacher-forced on the (quantized) context cache."""
    cache = lm.prefill(context, quant=quant)
    cache = cache.with_room(len(continuation), bucket)
    tokens = np.asarray([continuation], np.int32)
    logits, _, _ = generation.prefill(lm.params, lm.cfg, tokens, np.asarray([len(continuation)]), cache,
                                      all_logits=True)
    return jax.nn.log_softmax(logits[0, : len(continuation)], axis=-1), cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--quant", nargs="+", default=DEFAULT_QUANT)
    p.add_argument("--calibration", type=Path, default=DATA / "wikitext-2" / "valid.txt")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for q in args.quant:  # fail on a bad spec before the long run
        kvjax.quantizers.get(q.removesuffix("-nuq"))
    lm = kvjax.load(args.model, dtype="float32")
    ids = prompt_ids(lm, args.context + args.eval).tolist()
    context, continuation = ids[: args.context], ids[args.context:]
    ref, full_cache = continuation_logits(lm, context, continuation, None)
    lines = [f"{args.model}, float32, context {args.context} tokens (quantized), {args.eval} teacher-forced "
             f"tokens on top; full cache {kvjax.cache_nbytes(full_cache):,} bytes", "",
             "| quant | bits / element | cache bytes (context) | mean KL | max KL | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for spec in tqdm(args.quant, desc="quantizers", file=sys.stderr):
        q = quantizer(lm, spec, args.calibration, args.calib_tokens)
        logp, _ = continuation_logits(lm, context, continuation, q)
        kl = jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1)
        agree = float(jnp.mean(jnp.argmax(ref, -1) == jnp.argmax(logp, -1)))
        rep = kvjax.memory_report(lm.prefill(context, quant=q))
        lines.append(f"| {spec} | {rep['bits_per_element']:.2f} | {rep['total']:,} | {float(kl.mean()):.2e} | "
                     f"{float(kl.max()):.2e} | {agree:.3f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
