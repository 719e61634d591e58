"""Parity with Hugging Face transformers on the real SmolLM2-135M-Instruct weights.

Golden files come from `tests/golden/make_golden.py` (transformers, float32, same GGUF weights).
Logits must agree within 2e-4 (max abs), argmax at every position and greedy continuations exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden" / "smollm2-135m"
PROMPTS = json.loads((GOLDEN / "prompts.json").read_text())
ATOL = 2e-4


def _ids(lm, spec) -> list[int]:
    if spec["kind"] == "chat":
        return lm.chat(spec["messages"], add_generation_prompt=spec["add_generation_prompt"])
    return lm.encode(spec["text"])


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_tokenizer_reproduces_golden_ids(smollm2, name):
    golden = np.load(GOLDEN / f"{name}.npz")
    assert _ids(smollm2, PROMPTS[name]) == golden["ids"].tolist()


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_logits_match_transformers(smollm2, name):
    golden = np.load(GOLDEN / f"{name}.npz")
    logits = smollm2.logits(golden["ids"][None])[0]
    np.testing.assert_allclose(logits[-1], golden["last_logits"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), golden["argmax"])
    if "logits" in golden:
        np.testing.assert_allclose(logits, golden["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_continuation_matches_transformers(smollm2, name):
    golden = np.load(GOLDEN / f"{name}.npz")
    out = smollm2.generate(golden["ids"], max_new_tokens=16, stop_at_eos=False)
    assert out.ids == golden["greedy16"].tolist()


def test_batched_prompts_of_different_lengths_match_golden(smollm2):
    """Short and long prompts in one batch: each row's greedy tokens equal its golden continuation."""
    names = ["short", "chat", "long500"]
    goldens = [np.load(GOLDEN / f"{n}.npz") for n in names]
    out = smollm2.generate([g["ids"].tolist() for g in goldens], max_new_tokens=16, stop_at_eos=False)
    for name, g, ids in zip(names, goldens, out.ids):
        assert ids == g["greedy16"].tolist(), name


def test_chat_answers_capital_of_france(smollm2):
    out = smollm2.generate(smollm2.chat([{"role": "user", "content": "What is the capital of France?"}]),
                           max_new_tokens=16)
    assert "Paris" in out.text
