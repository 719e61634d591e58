"""Prompts of the retrieval tasks (passkey, needle in a haystack), built at the token level.

Every sample has two parts (kvpress semantics):

* `context`: the ids that are prefilled and compressed, exactly `length` tokens: the chat frame's
  start, the task statement, a haystack with needle(s) inserted at sentence boundaries, and (for the
  query-aware variant) the question;
* `suffix`: the ids fed on top of the compressed cache: the question (unless it already ended the
  context), the end of the user turn, the assistant header and the answer prefix.

Concatenated, context + suffix is the same prompt in both variants; only the split point moves.
Haystacks are tokenized once, sentence by sentence (each with its leading space), so sentence
boundaries are token indices; a haystack of H tokens is cut from a seeded starting sentence and
truncated at the token level, and a needle at depth d goes at the last boundary <= d * H.
Every random choice comes from `sample_rng(seed, task, length, depth, index)`, so a sample is a pure
function of its coordinates and the seed, whatever else a run asks for.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Callable, Sequence

import numpy as np

from kvjax.data import Corpus, read_folder

Encode = Callable[[str], list]

PASSKEY_TASK = "Read the following text and answer: what is the pass key?"
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"

NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER_PREFIX = "The best thing to do in San Francisco is"
NIAH_EXPECT = ("Dolores Park",)

@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of a task.

    Attributes:
      task: task name ("passkey", "niah", "ruler"); subtask: e.g. "niah_single_2" ("" if none).
      length: tokens of `context`.  depth: requested needle depth in [0, 1] (None: drawn or n/a).
      index: sample number within its (task, subtask, length, depth) cell.
      context: ids prefilled and compressed.  suffix: ids fed on top of the compressed cache.
      answers: reference strings (scored by `kvjax.eval.scoring`).
      max_new_tokens: greedy tokens to generate.
      needle_depth: where the (first) needle landed, tokens of haystack before it / haystack tokens.
    """

    task: str
    subtask: str
    length: int
    depth: float | None
    index: int
    context: tuple[int, ...]
    suffix: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    needle_depth: float | None = None


@dataclasses.dataclass(frozen=True)
class Haystack:
    """A text as one token stream. ids: int32 [N]; starts: int [n_sentences] index of each sentence's
    first token (ascending, starts[0] == 0)."""

    ids: np.ndarray
    starts: np.ndarray


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (whitespace collapsed), split after '.', '!' or '?'."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def tokenize_haystack(encode: Encode, sentences: Sequence[str]) -> Haystack:
    """Token stream of `sentences`, each tokenized with a leading space."""
    pieces = [encode(" " + s) for s in sentences]
    pieces = [p for p in pieces if p]
    if not pieces:
        raise ValueError("the haystack has no text")
    sizes = np.array([len(p) for p in pieces])
    return Haystack(ids=np.concatenate([np.asarray(p, np.int32) for p in pieces]),
                    starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]))


def corpus_sentences(corpus: Corpus) -> list[str]:
    """Sentences of every document of a corpus, in order."""
    return [s for d in corpus.documents for s in split_sentences(d)]


def read_haystack_dir(path) -> list[str]:
    """Sentences of every .txt file of a folder (sorted by name; binary files are refused)."""
    return corpus_sentences(read_folder(path))


def cut(hay: Haystack, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n tokens of the haystack from sentence `first` on (cycling through it as often as needed).

    Returns (ids int32 [n], boundaries int [m]): the indices in [0, n] where a sentence starts
    (0 included; n included when the cut ends exactly at a sentence's end)."""
    off = int(hay.starts[first])
    total = len(hay.ids)
    reps = 1 + -(-(n + off) // total)
    ids = np.tile(hay.ids, reps)[off:off + n]
    starts = (hay.starts[None, :] + total * np.arange(reps)[:, None]).ravel() - off
    return ids, starts[(starts >= 0) & (starts <= n)]


def insert(ids: np.ndarray, boundaries: np.ndarray, needles: Sequence[Sequence[int]],
           depths: Sequence[float]) -> tuple[np.ndarray, list[int]]:
    """Insert needle ids at the last sentence boundary <= depth * len(ids), for each (needle, depth).

    Returns (ids with the needles, the boundary index each needle went to, in the order given)."""
    n = len(ids)
    at = [int(boundaries[np.searchsorted(boundaries, d * n, side="right") - 1]) for d in depths]
    out = ids
    for i in sorted(range(len(at)), key=lambda i: (at[i], i), reverse=True):  # last first: indices stay valid
        out = np.concatenate([out[:at[i]], np.asarray(needles[i], np.int32), out[at[i]:]])
    return out, at


def chat_frame(tokenizer) -> tuple[str, str]:
    """(text before, text after) a single user message (`Tokenizer.chat_frame`)."""
    return tokenizer.chat_frame()


def piece_encoder(tokenizer) -> Encode:
    """Ids of a piece of a longer prompt (haystack sentences, needles, the suffix): never a BOS, even
    for a tokenizer that starts every `encode` with one (Gemma)."""
    return functools.partial(tokenizer.encode, add_special_tokens=False)


def head_ids(tokenizer, text: str) -> list[int]:
    """Ids of a prompt's start (`chat_frame`'s text before, then the task's head): a chat template
    writes the BOS itself; plain text gets the tokenizer's, if it adds one."""
    return tokenizer.encode(text, add_special_tokens=not tokenizer.has_chat_template)


def sample_rng(seed: int, task: str, length: int, depth: float | None, index: int) -> np.random.Generator:
    """The random generator of one sample: a pure function of its coordinates and the run's seed."""
    d = 1_000_001 if depth is None else int(round(depth * 1_000_000))
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, d, index])


@dataclasses.dataclass(frozen=True)
class Layout:
    """Text around the haystack: head (after the chat frame's start), context tail, suffix text
    (before the chat frame's end) and answer prefix (after the assistant header)."""

    head: str
    tail: str
    question: str
    answer_prefix: str


def assemble(tokenizer, layout: Layout, hay: Haystack, first: int, needles: Sequence[str],
             depths: Sequence[float], length: int) -> tuple[tuple[int, ...], tuple[int, ...], list[float]]:
    """Context of exactly `length` tokens and suffix ids; the needles' depths as landed.

    The haystack fills whatever the fixed text and the needles leave (a ValueError if nothing)."""
    before, after = chat_frame(tokenizer)
    encode = piece_encoder(tokenizer)
    head = head_ids(tokenizer, before + layout.head)
    tail = encode(layout.tail) if layout.tail else []
    needle_ids = [encode(" " + s) for s in needles]
    fixed = len(head) + len(tail) + sum(len(x) for x in needle_ids)
    n_hay = length - fixed
    if n_hay < 1:
        raise ValueError(f"length {length} is too short: the task's fixed text and needles take {fixed} tokens")
    ids, bounds = cut(hay, first, n_hay)
    ids, at = insert(ids, bounds, needle_ids, depths)
    context = tuple(int(t) for t in np.concatenate([head, ids, tail]).astype(np.int64))
    suffix = tuple(encode(layout.question + after + layout.answer_prefix))
    return context, suffix, [a / n_hay for a in at]


def retrieval_layout(task: str, question: str, answer_prefix: str, question_in_context: bool) -> Layout:
    """Task stated first; the question ends the compressed context (query-aware) or starts the suffix."""
    q = "\n\n" + question
    return Layout(head=task, tail=q if question_in_context else "", question="" if question_in_context else q,
                  answer_prefix=answer_prefix)


def passkey_sample(tokenizer, filler: Haystack, length: int, depth: float | None, index: int, seed: int,
                   question_in_context: bool = False, max_new_tokens: int = 10) -> Sample:
    """Passkey retrieval (METHODS.md): a 5-6 digit key at `depth` (drawn uniformly if None) in filler text."""
    rng = sample_rng(seed, "passkey", length, depth, index)
    key = str(int(rng.integers(10_000, 1_000_000)))
    d = float(rng.uniform()) if depth is None else depth
    layout = retrieval_layout(PASSKEY_TASK + " " + PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX,
                              question_in_context)
    context, suffix, landed = assemble(tokenizer, layout, filler, 0, [PASSKEY_NEEDLE.format(key=key)], [d], length)
    return Sample("passkey", "", length, depth, index, context, suffix, (key,), max_new_tokens, landed[0])


def niah_sample(tokenizer, hay: Haystack, length: int, depth: float, index: int, seed: int,
                needle: str = NIAH_NEEDLE, question: str = NIAH_QUESTION, answer_prefix: str = NIAH_ANSWER_PREFIX,
                expect: Sequence[str] = NIAH_EXPECT, question_in_context: bool = False,
                max_new_tokens: int = 32) -> Sample:
    """Needle in a haystack: `needle` at `depth` of essays cut from a seeded starting sentence."""
    rng = sample_rng(seed, "niah", length, depth, index)
    first = int(rng.integers(len(hay.starts)))
    layout = retrieval_layout(f"Read the following text and answer: {question}", question, answer_prefix,
                              question_in_context)
    context, suffix, landed = assemble(tokenizer, layout, hay, first, [needle], [depth], length)
    return Sample("niah", "", length, depth, index, context, suffix, tuple(expect), max_new_tokens, landed[0])


def filler_haystack(encode: Encode) -> Haystack:
    """The passkey filler ("The grass is green. ...") as a haystack (cut() cycles through it)."""
    return tokenize_haystack(encode, split_sentences(FILLER))
