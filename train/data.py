"""Training data: a token stream cut into fixed-length windows, served by a grain `MapDataset`.

    tokens = load_tokens("corpus.txt", lm.tokenizer)   # or None: the default data (below)
    batches = token_batches(tokens, seq_len=128, batch_size=8, seed=0)
    batches[step]                      # int32 [B, L + 1], the same for a given (seed, step)

Sources (`load_tokens`):
  * a text file, or a directory (every `*.txt` below it, in sorted path order); binary files are refused;
  * a `.npy` array of token ids (any integer dtype, flattened);
  * `tfds:NAME[/CONFIG][:SPLIT]`: a TensorFlow Datasets source read with `tfds.data_source`
    (random access, no TensorFlow), its `text` feature; the split defaults to `train`;
  * None (no `--data`): `kvjax.data.resolve("train")`, i.e. `$KVJAX_DATA/tinyshakespeare.txt`, else a
    prepared TFDS dataset, else English-like prose generated from the seed.
Documents are tokenized and joined with the tokenizer's end-of-sequence id between them, the whole
corpus once in memory (meant for corpora up to a few hundred MB).

Windows: W = (N - 1) // L non-overlapping windows of L + 1 tokens (inputs are the first L, targets
the last L), shuffled with `seed` and reshuffled every epoch by grain, batched B at a time. The
dataset is random access: the batch of step s is `batches[s]`, a pure function of (seed, s), so a
resumed run reads exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from kvjax.data import read_text, resolve, tfds_data_dir, tfds_documents

TFDS_PREFIX = "tfds:"


def load_tokens(source: str | Path | None, tokenizer, seed: int = 0) -> np.ndarray:
    """int32 [N] token ids of a text file, a directory of `*.txt`, a `.npy` id array, a TFDS source, or
    (None) the default data (`seed` picks the generated prose, if that is what it comes to)."""
    if source is None:
        texts = list(resolve("train", seed=seed).documents)
    elif str(source).startswith(TFDS_PREFIX):
        texts = _tfds_texts(str(source)[len(TFDS_PREFIX):])
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"--data: no such file or directory {path}")
        if path.suffix == ".npy":
            ids = np.load(path).reshape(-1)
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"--data: {path} holds {ids.dtype}, expected integer token ids")
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(f"--data: {path} holds ids outside the vocabulary [0, {tokenizer.vocab_size})")
            return ids.astype(np.int32)
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        texts = [read_text(f) for f in files]
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    ids: list[int] = []
    for text in texts:
        if text.strip():
            ids.extend(tokenizer.encode(text))
            if eos is not None:
                ids.append(eos)
    return np.asarray(ids, np.int32)


def _tfds_texts(spec: str) -> list[str]:
    """Texts of `NAME[/CONFIG][:SPLIT]` (feature `text`) in `kvjax.data.tfds_data_dir()`, prepared
    there first if need be."""
    name, _, split = spec.partition(":")
    if not name:
        raise ValueError("--data tfds: give a dataset name, e.g. tfds:tiny_shakespeare")
    return tfds_documents(name, split or "train", "text", tfds_data_dir(), download=True)


def token_batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Infinite random-access dataset: element s is the int32 [batch_size, seq_len + 1] batch of step s."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the dataset holds {len(tokens)} tokens: not one window of seq_len + 1 = {seq_len + 1} "
                         "(empty data, or use a shorter --seq-len)")
    tokens = np.asarray(tokens, np.int32)

    def window(i):
        return tokens[i * seq_len: i * seq_len + seq_len + 1]

    return grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat().map(window).batch(batch_size)
