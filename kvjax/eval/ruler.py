"""RULER-style synthetic tasks (NVIDIA/RULER `scripts/data/synthetic`, arXiv 2404.06654), generated in-house.

| subtask | haystack | needles | answer |
|---|---|---|---|
| niah_single_1 | repeated "The grass is green..." | 1: word key -> 7-digit number | the number |
| niah_single_2 | essays | 1: word key -> number | the number |
| niah_single_3 | essays | 1: word key -> uuid | the uuid |
| niah_multikey_1 | essays | 4 keys, 3 of them distractors | 1 number |
| niah_multikey_2 | distractor needles only (word -> number) | 1 among them | 1 number |
| niah_multikey_3 | distractor needles only (uuid -> uuid) | 1 among them | 1 uuid |
| niah_multivalue | essays | 1 key, 4 values | 4 numbers |
| niah_multiquery | essays | 4 keys, all queried | 4 numbers |
| vt | repeated noise | chain VAR A = N, VAR B = VAR A, ... (4 hops), one solved example first | 5 names |
| cwe | numbered word list: 10 words x30, others x3 (x6 / x1 below 4096 tokens), one solved example | - | 10 words |

"essays" is the haystack corpus: `--haystack`, else `kvjax.data.resolve("haystack")` ($KVJAX_DATA's Paul
Graham essays, a prepared TFDS dataset, or prose generated from the seed).
Needle: "One of the special magic {numbers|uuids} for {key} is: {value}." at random sentence boundaries;
the question and answer prefix use the singular when one value is asked for. Contexts have exactly
`length` tokens (haystacks are cut at the token level, see `kvjax.eval.prompts`); the question, the
assistant header and the answer prefix form the suffix. Scored with `string_match_all`.
Tokens to generate: niah 128, vt 30, cwe 120 (RULER's).
"""
from __future__ import annotations

import uuid

import numpy as np

from kvjax.eval.prompts import (FILLER, Haystack, Layout, Sample, assemble, chat_frame, filler_haystack, head_ids,
                                piece_encoder,
                                sample_rng, split_sentences, tokenize_haystack)
from kvjax.eval.words import ADJECTIVES, NOUNS, VERBS

NIAH = {  # haystack, key kind, value kind, keys in the text, values per key, keys queried
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needles", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needles", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
SUBTASKS = tuple(NIAH) + ("vt", "cwe")
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120}
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_TASK = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are:")
CWE_TASK = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"
WORD_POOL = NOUNS + ADJECTIVES + VERBS


def _key(rng, kind: str) -> str:
    if kind == "uuids":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def _value(rng, kind: str) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4)) if kind == "uuids" else str(rng.integers(10**6, 10**7))


def _distinct(draw, n: int, avoid=()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out and x not in avoid:
            out.append(x)
    return out


def niah_sample(tokenizer, essays: Haystack, subtask: str, length: int, index: int, seed: int) -> Sample:
    rng = sample_rng(seed, "ruler/" + subtask, length, None, index)
    hay_kind, key_kind, value_kind, n_keys, n_values, n_queries = NIAH[subtask]
    keys = _distinct(lambda: _key(rng, key_kind), n_keys)
    values = [_distinct(lambda: _value(rng, value_kind), n_values) for _ in keys]
    needles = [NEEDLE.format(kind=value_kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    queried = keys[:n_queries]
    answers = [v for k, vs in zip(keys, values) if k in queried for v in vs]
    if hay_kind == "needles":  # the haystack is distractor needles with other keys
        n = length // 8 + 1
        others = _distinct(lambda: _key(rng, key_kind), n, avoid=keys)
        hay = tokenize_haystack(piece_encoder(tokenizer),
                                [NEEDLE.format(kind=value_kind, key=k, value=_value(rng, value_kind)) for k in others])
        first = 0
    else:
        hay = filler_haystack(piece_encoder(tokenizer)) if hay_kind == "noise" else essays
        first = int(rng.integers(len(hay.starts)))
    depths = list(rng.uniform(size=len(needles)))
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    one = len(answers) == 1
    singular = value_kind[:-1]
    question = (f"What is the special magic {singular} for {query} mentioned in the provided text?" if one else
                f"What are all the special magic {value_kind} for {query} mentioned in the provided text?")
    prefix = (f"The special magic {singular} for {query} mentioned in the provided text is" if one else
              f"The special magic {value_kind} for {query} mentioned in the provided text are")
    layout = Layout(head=f"Some special magic {value_kind} are hidden within the following text. Make sure to "
                         f"memorize it. I will quiz you about the {value_kind} afterwards.",
                    tail="", question="\n" + question, answer_prefix=prefix)
    context, suffix, landed = assemble(tokenizer, layout, hay, first, needles, depths, length)
    return Sample("ruler", subtask, length, None, index, context, suffix, tuple(answers), MAX_NEW_TOKENS["niah"],
                  landed[0])


def _chain(rng, hops: int) -> tuple[list[str], str, list[str]]:
    """(lines, value, names) of one variable chain: VAR A = 12345, VAR B = VAR A, ..."""
    names = _distinct(lambda: "".join(chr(65 + int(c)) for c in rng.integers(26, size=5)), hops + 1)
    value = str(rng.integers(10_000, 100_000))
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return lines, value, names


def vt_sample(tokenizer, subtask: str, length: int, index: int, seed: int, hops: int = 4) -> Sample:
    """Variable tracking: one chain of `hops` assignments hidden in noise, after one solved example."""
    rng = sample_rng(seed, "ruler/" + subtask, length, None, index)
    ex_lines, ex_value, ex_names = _chain(rng, hops)
    noise = split_sentences(FILLER)
    example = " ".join(s for pair in zip(ex_lines, noise * 2) for s in pair)
    example = (f"{VT_TASK} {example}\n{VT_QUESTION.format(value=ex_value)} "
               f"{VT_ANSWER.format(n=hops + 1, value=ex_value)} {' '.join(ex_names)}\n\n")
    lines, value, names = _chain(rng, hops)
    depths = sorted(rng.uniform(size=len(lines)))
    layout = Layout(head=example + VT_TASK, tail="", question="\n" + VT_QUESTION.format(value=value),
                    answer_prefix=VT_ANSWER.format(n=hops + 1, value=value))
    filler = filler_haystack(piece_encoder(tokenizer))
    context, suffix, landed = assemble(tokenizer, layout, filler, 0, lines, depths, length)
    return Sample("ruler", subtask, length, None, index, context, suffix, tuple(names), MAX_NEW_TOKENS["vt"],
                  landed[0])


def _word_lines(tokenizer, words: list[str]) -> list[list[int]]:
    encode = piece_encoder(tokenizer)
    return [encode(f"{i + 1}. {w}\n") for i, w in enumerate(words)]


def cwe_sample(tokenizer, subtask: str, length: int, index: int, seed: int) -> Sample:
    """Common words extraction: the 10 words repeated most often in a numbered list of `length` tokens."""
    rng = sample_rng(seed, "ruler/" + subtask, length, None, index)
    freq_common, freq_rare = (30, 3) if length >= 4096 else (6, 1)
    pool = [WORD_POOL[i] for i in rng.permutation(len(WORD_POOL))]
    ex_common, ex_rare, common, rare = pool[:10], pool[10:30], pool[30:40], pool[40:]
    ex_words = [ex_common[i] for i in rng.permutation(np.repeat(np.arange(10), 3))] + ex_rare
    ex_words = [ex_words[i] for i in rng.permutation(len(ex_words))]
    example = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(ex_words))
    head = (f"{CWE_TASK}\n{example}\n{CWE_QUESTION} {CWE_ANSWER} {' '.join(ex_common)}\n\n{CWE_TASK}\n")
    before, after = chat_frame(tokenizer)
    first = head_ids(tokenizer, before + head)
    budget = length - len(first)

    order_seed = int(rng.integers(2**32))

    def words_for(n_rare: int) -> list[str]:
        ws = [w for w in common for _ in range(freq_common)]
        ws += [rare[(i // freq_rare) % len(rare)] for i in range(n_rare)]
        return [ws[i] for i in np.random.default_rng(order_seed).permutation(len(ws))]

    def fits(n_rare: int) -> bool:
        return sum(len(x) for x in _word_lines(tokenizer, words_for(n_rare))) <= budget

    if not fits(0):
        raise ValueError(f"length {length} is too short for the common-words list (10 words x {freq_common})")
    lo, hi = 0, budget // 4  # binary search: the most rare lines whose list fits (a line has >= 4 tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    words = words_for(lo)
    if max((words.count(w) for w in set(words) - set(common)), default=0) + 1 >= freq_common:
        raise ValueError(f"length {length} needs more distinct words than the shipped pool ({len(WORD_POOL)})")
    # one more rare line (it did not fit whole: the total is order-independent) fills the last tokens
    lines = _word_lines(tokenizer, words + [rare[(lo // freq_rare) % len(rare)]])
    ids = [t for line in lines for t in line][:budget]
    suffix = piece_encoder(tokenizer)(CWE_QUESTION + after + CWE_ANSWER)
    return Sample("ruler", subtask, length, None, index, tuple(first + ids), tuple(suffix), tuple(common),
                  MAX_NEW_TOKENS["cwe"])


def ruler_sample(tokenizer, essays: Haystack, subtask: str, length: int, index: int, seed: int) -> Sample:
    if subtask in NIAH:
        return niah_sample(tokenizer, essays, subtask, length, index, seed)
    if subtask == "vt":
        return vt_sample(tokenizer, subtask, length, index, seed)
    if subtask == "cwe":
        return cwe_sample(tokenizer, subtask, length, index, seed)
    raise ValueError(f"unknown RULER subtask {subtask!r}; known: {', '.join(SUBTASKS)}")
