"""The fraction of prompt tokens MiniCache retains unmerged (`kvjax.methods.minicache.retained_fraction`) under
both readings of its retention rule, on the prompts of experiments/crosslayer.sh (SmolLM2-135M): the WikiText-2
perplexity chunks (512 context tokens) and the passkey prompts (512 tokens), gamma 0.05 and 0.1; and how similar
adjacent layers' keys and values are on the first chunk (MiniCache's premise): the mean angular distance of the
pairs (0 = same direction, 0.5 = orthogonal) and the relative error of each layer's rebuilt K / V.

    python experiments/minicache_retained.py OUT.md [DATA_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import kvjax
from kvjax.eval import prompts
from kvjax.eval.perplexity import text_chunks
from kvjax.methods.minicache import retained_fraction
from kvjax.states.merged import slerp


def similarity(lm, ids) -> list[str]:
    """Per pair of adjacent layers (2i, 2i + 1): mean angular distance of keys / values, and the relative error
    |m e - x| / |x| of each layer's K / V rebuilt from the SLERP direction (t = 0.6) and its own magnitudes."""
    cache = lm.prefill([list(ids)])
    n = len(ids)
    lines = ["| pair | key distance | value distance | key error (lower, upper) | value error (lower, upper) |",
             "|---|---:|---:|---:|---:|"]
    for a in range(0, len(cache.layers) - 1, 2):
        cells = []
        for name in ("k", "v"):
            xa, xb = (getattr(cache.layers[i], name)[:, :, :n] for i in (a, a + 1))
            e, na, nb, d = slerp(xa, xb, 0.6)
            err = [float(np.linalg.norm(e * m[..., None] - x) / np.linalg.norm(x)) for m, x in ((na, xa), (nb, xb))]
            cells.append((float(d.mean()), err))
        lines.append(f"| {a}, {a + 1} | {cells[0][0]:.3f} | {cells[1][0]:.3f} | {cells[0][1][0]:.2f}, "
                     f"{cells[0][1][1]:.2f} | {cells[1][1][0]:.2f}, {cells[1][1][1]:.2f} |")
    return lines


def main(out: Path, data: Path) -> None:
    lm = kvjax.load()
    tok = lm.tokenizer
    chunks = text_chunks(tok, data / "wikitext-2" / "test.txt", 512, 64, 2)[:, :512]
    filler = prompts.filler_haystack(prompts.piece_encoder(tok))
    passkeys = np.asarray([prompts.passkey_sample(tok, filler, 512, None, i, 0).context for i in range(4)])
    lines = ["# MiniCache: tokens retained unmerged (SmolLM2-135M, layers 15..28 in 7 pairs)", "",
             "Fraction of (pair, KV head, prompt token) retained; at most ceil(gamma T) per head (the state's static "
             "slots). Made by `python experiments/minicache_retained.py` (crosslayer.sh step `merge`).", "",
             "| prompts | retention | gamma | retained fraction | slots held (ceil(gamma T) / T) |",
             "|---|---|---:|---:|---:|"]
    for name, rows in (("WikiText-2 test, 2 x 512 tokens", chunks), ("passkey, 4 x 512 tokens", passkeys)):
        for rule in ("distinct", "threshold"):
            for gamma in (0.05, 0.1):
                cache = lm.prefill([list(r) for r in rows], method=f"minicache(retention={rule}, gamma={gamma})")
                slots = cache.layers[cache.share[15]].kept[0].capacity / rows.shape[1]
                lines.append(f"| {name} | {rule} | {gamma} | {retained_fraction(cache):.4f} | {slots:.4f} |")
    lines += ["", "### Adjacent layers' similarity (first WikiText-2 chunk, 512 tokens; per KV head and token)", "",
              *similarity(lm, chunks[0])]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data"))
