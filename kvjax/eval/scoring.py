"""Scoring of generated answers, and perplexity from per-token negative log-likelihoods.

* `contains_all` (passkey, NIAH): 1 if every reference appears in the answer (case-insensitive), else 0.
* `string_match_all` (RULER `scripts/eval/synthetic/constants.py`): the mean over references of
  case-insensitive substring hits, after RULER's post-processing (strip, control characters -> "\\n").
"""
from __future__ import annotations

import math
import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(text: str) -> str:
    """RULER's `postprocess_pred`: strip, then every control character becomes a newline."""
    return _CONTROL.sub("\n", text.strip())


def string_match_all(answer: str, references: Sequence[str]) -> float:
    """Fraction of references found in the answer (case-insensitive), in [0, 1]."""
    if not references:
        raise ValueError("no reference to score against")
    text = postprocess(answer).lower()
    return sum(r.lower() in text for r in references) / len(references)


def contains_all(answer: str, references: Sequence[str]) -> float:
    """1.0 if every reference appears in the answer (case-insensitive), else 0.0."""
    return float(string_match_all(answer, references) == 1.0)


SCORERS = {"passkey": contains_all, "niah": contains_all, "ruler": string_match_all}


def perplexity(nll: float) -> float:
    """exp(mean negative log-likelihood per token, natural log)."""
    return math.exp(nll)
