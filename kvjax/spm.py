"""SentencePiece BPE encoding from a GGUF's vocabulary (`tokenizer.ggml.model == "llama"`: tokens, scores,
token types), without the `sentencepiece` library; Gemma 3's tokenizer.

The algorithm is SentencePiece's (Kudo & Richardson 2018; google/sentencepiece `normalizer.cc` and
`bpe_model.cc`, identity normalization as Gemma's model sets it):

1. Normalize: every space becomes "▁" (no dummy prefix unless `tokenizer.ggml.add_space_prefix`); then
   at each position the longest user-defined piece (type 4, e.g. "\\n\\n") is one frozen symbol, any
   other character a symbol of its own. Gemma's user-defined runs of literal spaces therefore never
   match (the normalizer escapes spaces inside them too), as in the library.
2. Merge: repeatedly join the adjacent pair of unfrozen symbols whose concatenation is a normal piece
   (type 1) of the highest score, the leftmost pair among equals.
3. A symbol that is no piece falls back to its UTF-8 bytes (`<0xXX>` pieces, type 6).

Control tokens (type 3, e.g. "<start_of_turn>") written in the text are matched whole first, as
llama.cpp and transformers do with special tokens (the `sentencepiece` library would spell them out).
`tests/golden/make_gemma3_golden.py` records the `sentencepiece` library's ids on varied texts through
a model file built from the same vocabulary; `tests/test_gemma3.py` compares with them.
"""
from __future__ import annotations

import heapq
import re
from types import SimpleNamespace
from typing import Sequence

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


class SentencePieceBPE:
    """The tokenizer backend `kvjax.tokenizer.Tokenizer` wraps (the `tokenizers.Tokenizer` calls it makes:
    `encode(text, add_special_tokens).ids`, `decode`, `get_vocab_size`, `id_to_token`)."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], unk_id: int | None,
                 add_space_prefix: bool = False):
        if not len(tokens) == len(scores) == len(types):
            raise ValueError(f"GGUF SentencePiece vocabulary: {len(tokens)} tokens, {len(scores)} scores, "
                             f"{len(types)} types")
        self._tokens, self._types = list(tokens), list(types)
        self._normal = {t: (float(s), i) for i, (t, s, ty) in enumerate(zip(tokens, scores, types)) if ty == NORMAL}
        self._ids = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (NORMAL, USER_DEFINED)}
        self._user: dict[str, list[str]] = {}  # first character -> user-defined pieces, longest first
        for t, ty in zip(tokens, types):
            if ty == USER_DEFINED and t:
                self._user.setdefault(t[0], []).append(t)
        for cands in self._user.values():
            cands.sort(key=len, reverse=True)
        self._bytes = {int(t[3:5], 16): i for i, (t, ty) in enumerate(zip(tokens, types))
                       if ty == BYTE and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)}
        control = sorted((t for t, ty in zip(tokens, types) if ty == CONTROL and t), key=len, reverse=True)
        self._control = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
        self._control_re = re.compile("|".join(map(re.escape, control))) if control else None
        self._unk = unk_id
        self._prefix = add_space_prefix

    # ------------------------------------------------------------------ the `tokenizers` calls
    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self._tokens)

    def id_to_token(self, i: int) -> str:
        return self._tokens[i]

    def encode(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        ids, start = [], 0
        for m in self._control_re.finditer(text) if self._control_re else ():
            ids += self._encode_ordinary(text[start:m.start()])
            ids.append(self._control[m.group()])
            start = m.end()
        return SimpleNamespace(ids=ids + self._encode_ordinary(text[start:]))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, pending = [], bytearray()
        for i in ids:
            ty = self._types[i]
            if ty == BYTE:
                pending.append(int(self._tokens[i][3:5], 16))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if ty in (CONTROL, UNKNOWN) and skip_special_tokens:
                continue
            out.append(self._tokens[i].replace(SPACE, " "))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    # ------------------------------------------------------------------ SentencePiece BPE
    def _normalized(self, text: str) -> tuple[list[str], list[bool]]:
        """Initial symbols and which are frozen (user-defined pieces)."""
        text = (" " + text if self._prefix and text else text).replace(" ", SPACE)
        symbols, frozen, i = [], [], 0
        while i < len(text):
            match = next((u for u in self._user.get(text[i], ()) if text.startswith(u, i)), None)
            if match is not None:
                symbols.append(match)
                frozen.append(True)
                i += len(match)
            else:
                symbols.append(text[i])
                frozen.append(False)
                i += 1
        return symbols, frozen

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        sym, frozen = self._normalized(text)
        n = len(sym)
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            piece = sym[left] + sym[right]
            hit = self._normal.get(piece)
            if hit is not None:
                heapq.heappush(heap, (-hit[0], left, right, piece))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, piece = heapq.heappop(heap)
            if not sym[left] or not sym[right] or nxt[left] != right or sym[left] + sym[right] != piece:
                continue  # stale: one side was merged since
            sym[left], sym[right] = piece, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        ids, i = [], 0
        while i >= 0:
            s = sym[i]
            if s in self._ids:
                ids.append(self._ids[s])
            elif self._bytes:
                ids += [self._bytes[b] for b in s.encode("utf-8")]
            else:
                ids.append(self._unk)
            i = nxt[i]
        return ids
