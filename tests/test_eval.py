"""The evaluation harness (`kvjax.eval`): prompts, scoring, the shared-prefill runner, resume, CLI errors.

Tiny random model and tokenizer everywhere, except the CLI tests and one small integration run on
the real default model.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import kvjax

from kvjax.cli import main
from kvjax.eval import prompts, records, ruler, runner, scoring
from kvjax.eval.perplexity import teacher_force, text_chunks
from kvjax.testing import tiny_lm, tiny_tokenizer_metadata
from kvjax.tokenizer import Tokenizer

ESSAY = ("Alpha beta gamma delta. Epsilon zeta eta theta iota! Kappa lambda mu? Nu xi omicron pi rho sigma. "
         "Tau upsilon phi chi psi omega. ") * 3


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(max_positions=2048)


@pytest.fixture(scope="module")
def essays(lm):
    return prompts.tokenize_haystack(lm.encode, prompts.split_sentences(ESSAY))


def _find(seq, sub) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if list(seq[i:i + len(sub)]) == list(sub)]


# --------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("length", [400, 517, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_exact_length_and_depth_on_a_sentence_boundary(lm, essays, length, depth):
    s = prompts.niah_sample(lm.tokenizer, essays, length, depth, 0, seed=1, needle="The code is 42.",
                            question="What is the code?", answer_prefix="The code is", expect=["42"])
    assert len(s.context) == length
    needle = lm.encode(" The code is 42.")
    at = _find(s.context, needle)
    assert len(at) == 1
    head = len(lm.encode(prompts.chat_frame(lm.tokenizer)[0] + "Read the following text and answer: What is the code?"))
    n_hay = length - head - len(needle)
    # the needle starts right after a sentence's end (or the head), at the last boundary <= depth * H
    before = lm.decode(s.context[:at[0]])
    assert at[0] == head or before.endswith((".", "!", "?"))
    longest = max(np.diff(essays.starts))
    assert depth * n_hay - longest <= at[0] - head <= depth * n_hay
    assert s.needle_depth == pytest.approx((at[0] - head) / n_hay)
    assert lm.decode(s.suffix).endswith("<|im_start|>assistant\nThe code is")


def test_passkey_prompt_layout_and_seed(lm):
    filler = prompts.filler_haystack(lm.encode)
    a = prompts.passkey_sample(lm.tokenizer, filler, 700, 0.5, 3, seed=0)
    b = prompts.passkey_sample(lm.tokenizer, filler, 700, 0.5, 3, seed=0)
    c = prompts.passkey_sample(lm.tokenizer, filler, 700, 0.5, 3, seed=1)
    assert a == b and a.answers != c.answers
    text = lm.decode(a.context)
    key = a.answers[0]
    assert 10_000 <= int(key) < 1_000_000
    assert text.index(prompts.PASSKEY_TASK) < text.index(prompts.PASSKEY_INTRO) < text.index(f"The pass key is {key}.")
    assert lm.decode(a.suffix) == "\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"
    qa = prompts.passkey_sample(lm.tokenizer, filler, 700, 0.5, 3, seed=0, question_in_context=True)
    assert len(qa.context) == 700 and lm.decode(qa.context).endswith("\n\nWhat is the pass key?")
    assert lm.decode(qa.suffix) == "<|im_end|>\n<|im_start|>assistant\nThe pass key is"
    with pytest.raises(ValueError, match="too short"):
        prompts.passkey_sample(lm.tokenizer, filler, 100, 0.5, 0, seed=0)


def test_a_base_model_gets_plain_prompts_with_one_bos(lm):
    """A tokenizer without a chat template that starts every text with a BOS (the gemma3-270m GGUF):
    the prompt is plain text, the BOS comes once, at the start of the context, and nowhere else."""
    meta = {**tiny_tokenizer_metadata(), "tokenizer.ggml.add_bos_token": True}
    del meta["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf_metadata(meta)
    bos = tok.bos_id
    assert not tok.has_chat_template and tok.encode("hi")[0] == bos
    assert tok.encode("hi", add_special_tokens=False)[0] != bos
    filler = prompts.filler_haystack(prompts.piece_encoder(tok))
    for qa in (False, True):
        s = prompts.passkey_sample(tok, filler, 300, 0.5, 0, seed=0, question_in_context=qa)
        ids = s.context + s.suffix
        assert len(s.context) == 300 and ids[0] == bos and bos not in ids[1:]
        assert tok.decode(ids[1:]).endswith("What is the pass key?\nThe pass key is")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    chunks = text_chunks(tok, readme, 24, 8, 3)
    assert chunks.shape == (3, 32) and (chunks[:, 0] == bos).all() and not (chunks[:, 1:] == bos).any()
    assert tok.decode(chunks[0, 1:].tolist()) == tok.decode(tok.encode(readme.read_text(), False)[:31])


def test_haystack_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prompts.read_haystack_dir(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no non-empty .txt"):
        prompts.read_haystack_dir(tmp_path)
    (tmp_path / "b.txt").write_text("One. Two three! Four?")
    assert prompts.read_haystack_dir(tmp_path) == ["One.", "Two three!", "Four?"]


@pytest.mark.parametrize("subtask", ruler.SUBTASKS)
def test_ruler_samples_have_exact_length_and_their_answers(lm, essays, subtask):
    length = 1500 if subtask == "cwe" else 900
    s = ruler.ruler_sample(lm.tokenizer, essays, subtask, length, 0, seed=0)
    assert len(s.context) == length and s == ruler.ruler_sample(lm.tokenizer, essays, subtask, length, 0, seed=0)
    text = lm.decode(s.context)
    n_answers = {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10}.get(subtask, 1)
    assert len(set(s.answers)) == n_answers
    if subtask == "cwe":  # after the solved example, each common word x6, every other word fewer times
        listing = text.rsplit(ruler.CWE_TASK, 1)[1]
        counts = {w: listing.count(f". {w}\n") for w in ruler.WORD_POOL}
        assert all(counts[w] == 6 for w in s.answers)
        assert max(c for w, c in counts.items() if w not in s.answers) < 6
    elif subtask == "vt":
        value = lm.decode(s.suffix).split("assigned the value ")[1].split(" ")[0]
        chain = [f"VAR {s.answers[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(s.answers, s.answers[1:])]
        positions = [text.rindex(line) for line in chain]
        assert positions == sorted(positions)
    else:
        for a in s.answers:
            assert f"is: {a}." in text
        if subtask == "niah_multikey_1":
            assert text.count("One of the special magic numbers for") == 4


def test_scoring():
    assert scoring.string_match_all(" The number is 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert scoring.string_match_all("\x07 ApPle\n", ["apple"]) == 1.0
    assert scoring.postprocess(" a\x01b\tc ") == "a\nb\nc"
    assert scoring.contains_all("key 12345.", ["12345"]) == 1.0
    assert scoring.contains_all("key 1234", ["12345"]) == 0.0
    assert scoring.contains_all("Dolores park, sandwich", ["dolores Park", "sandwich"]) == 1.0
    with pytest.raises(ValueError):
        scoring.string_match_all("x", [])


# ---------------------------------------------------------------------------------------- runner
METHODS = ["full", "streaming_llm", "snapkv", "pyramidkv", "tova", "knorm", "observed_attention",
           "expected_attention", "adakv:snapkv"]


@pytest.fixture(scope="module")
def passkey_samples(lm):
    filler = prompts.filler_haystack(lm.encode)
    return [prompts.passkey_sample(lm.tokenizer, filler, 512, None, i, seed=0) for i in range(3)]


@pytest.fixture(scope="module")
def branch_rows(lm, passkey_samples):
    rows = []
    configs = runner.make_configs(METHODS, [0.5, 0.75])
    runner.run_retrieval(lm, passkey_samples, configs, max_batch=2, todo=lambda k: True, emit=rows.extend)
    return rows


def test_every_branch_answers_as_a_fresh_prefill_with_that_method(lm, passkey_samples, branch_rows):
    assert len(branch_rows) == 3 * (1 + 8 * 2)
    for r in branch_rows:
        s = passkey_samples[r["sample"]]
        if r["method"] == "full":
            cache = lm.prefill(list(s.context))
            assert r["cache_bytes"] == r["full_cache_bytes"] == kvjax.cache_nbytes(cache)
        else:
            cache = lm.prefill(list(s.context), method=r["method"], ratio=r["ratio"])
            assert r["cache_bytes"] == kvjax.cache_nbytes(cache)  # the exact compressed size, not the padded one
        fresh = lm.generate(list(s.suffix), cache=cache, max_new_tokens=s.max_new_tokens)
        assert fresh.text == r["answer"], (r["method"], r["ratio"], r["sample"])
        assert r["score"] == scoring.contains_all(r["answer"], s.answers)


def test_union_of_observations_and_config_checks(lm):
    spec = runner.union_spec(runner.make_configs(METHODS, [0.5]))
    assert (spec.window, spec.col_sums, spec.qstats_from) == (64, True, 4)
    assert runner.union_spec([runner.Config("full")]) is None
    # CriticalKV's output-projected value norms are recorded when any configuration needs them
    assert runner.union_spec([runner.Config("snapkv", ratio=0.5), runner.Config("critical:snapkv", ratio=0.5)]).wov
    with pytest.raises(ValueError, match="different positions"):
        runner.union_spec([runner.Config("expected_attention", ratio=0.5),
                           runner.Config(kvjax.methods.ExpectedAttention(n_sink=8), ratio=0.5)])
    with pytest.raises(ValueError, match="needs --ratio or --budget"):
        runner.make_configs(["snapkv"])
    with pytest.raises(ValueError, match="always keeps 64"):
        runner.check_configs(lm.cfg, runner.make_configs(["snapkv"], [0.9]), [512])
    with pytest.raises(ValueError, match="unknown method"):
        runner.check_configs(lm.cfg, runner.make_configs(["nope"], [0.5]), [512])


def test_batches_pad_with_copies():
    assert runner.batches([1, 2, 3, 4, 5], 2) == [([1, 2], 2), ([3, 4], 2), ([5, 5], 1)]
    assert runner.batches([1, 2, 3, 4, 5], 8) == [([1, 2, 3, 4, 5], 5)]
    assert runner.batches(list(range(10)), 8) == [(list(range(5)), 5), (list(range(5, 10)), 5)]


def test_resume_computes_only_missing_rows(lm, passkey_samples, tmp_path):
    configs = runner.make_configs(["full", "snapkv"], [0.5])
    meta = dict(seed=0, model="tiny", model_hash=records.params_hash(lm.params), dtype="float32",
                options=json.dumps(dict(task="passkey")), kvjax_version="0", jax_version="0", device="cpu")
    path = tmp_path / "r.csv"
    out = records.ResultsFile(path, meta)
    runner.run_retrieval(lm, passkey_samples, configs, max_batch=3, todo=out.todo, emit=out.append)
    full = records.read_rows(path)
    assert len(full) == 6
    with pytest.raises(ValueError, match="--resume"):
        records.ResultsFile(path, meta)
    # keep the first 4 rows, as if the run had been interrupted, and resume
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=records.COLUMNS)
        w.writeheader()
        w.writerows(full[:4])
    out = records.ResultsFile(path, meta, resume=True)
    emitted = []
    runner.run_retrieval(lm, passkey_samples, configs, max_batch=3, todo=out.todo,
                         emit=lambda rows: (emitted.extend(rows), out.append(rows)))
    assert [records.row_key(r) for r in emitted] == [records.row_key(r) for r in full[4:]]
    again = records.read_rows(path)
    assert [(r["answer"], r["score"]) for r in again] == [(r["answer"], r["score"]) for r in full]
    with pytest.raises(ValueError, match="another seed"):
        records.ResultsFile(path, {**meta, "seed": 1}, resume=True)


def test_teacher_forcing_matches_full_logits_and_compression_changes_it(lm):
    ids = np.random.default_rng(0).integers(3, lm.cfg.vocab_size, size=(2, 160)).astype(np.int32)
    c, m = 128, 32
    logp = np.asarray(jax.nn.log_softmax(lm.logits(ids), axis=-1))
    expect = -np.take_along_axis(logp[:, c - 1:-1], ids[:, c:, None], axis=-1)[..., 0]  # [B, M]
    configs = [runner.Config("full"), runner.Config("knorm", ratio=0.75)]
    logits, cache, obs, _ = runner.shared_prefill(lm, ids[:, :c].tolist(), 256, runner.union_spec(configs))
    got = [np.asarray(teacher_force(lm.params, runner.branch(lm, cache, obs, k, c, m), logits, ids[:, c:], cfg=lm.cfg))
           for k in configs]
    np.testing.assert_allclose(got[0], expect, atol=2e-4)
    assert np.abs(got[1] - expect).max() > 1e-2


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["eval", "sudoku"], "unknown task 'sudoku'"),
    (["eval", "niah", "--depths", "1.5"], "--depths must be in [0, 1], got 1.5"),
    (["eval", "passkey", "--lengths", "9000"], "exceeds the model's maximum positions (8192)"),
    (["eval", "passkey", "--method", "snapkv", "--ratio", "0.5", "--lengths", "8180"],
     "prompt and answer need"),
    (["eval", "niah", "--haystack", "/nonexistent/folder"], "does not exist"),
    (["eval", "passkey", "--method", "snapkv"], "needs --ratio or --budget"),
    (["eval", "passkey", "--method", "bogus", "--ratio", "0.5"], "unknown method 'bogus'"),
    (["eval", "passkey", "--method", "compose(kivi-2, snapkv)", "--ratio", "0.5"], "comes before the method snapkv"),
    (["eval", "passkey", "--import", "/nonexistent/my_press.py", "--method", "my_press", "--ratio", "0.5"],
     "plugin /nonexistent/my_press.py: no such file"),
    (["eval", "passkey", "--lengths", "512", "--out", "/proc/kvjax/results.csv"], "cannot write the results file"),
])
def test_eval_bad_input_is_one_line_and_exit_2(smollm2, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax: error: ") and message in err and err.count("\n") == 1, err


def test_eval_empty_haystack_folder(smollm2, tmp_path, capsys):
    assert main(["eval", "niah", "--haystack", str(tmp_path)]) == 2
    assert "holds no non-empty .txt file" in capsys.readouterr().err


def test_eval_passkey_on_the_real_model_then_plot(smollm2, tmp_path, capsys):
    out = tmp_path / "pk.csv"
    argv = ["eval", "passkey", "--method", "full", "snapkv", "--ratio", "0.5", "--lengths", "512", "--n", "2",
            "--question-in-context", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    rows = records.read_rows(out)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"full", "snapkv"}
    for r in rows:  # the full cache finds both keys at 512 tokens; every row is scored from its answer
        assert r["correct"] == str(int(r["expected"] in r["answer"]))
        assert r["method"] != "full" or r["correct"] == "1", r["answer"]
    snap = [r for r in rows if r["method"] == "snapkv"][0]
    assert int(snap["cache_bytes"]) < 0.55 * int(snap["full_cache_bytes"])
    assert rows[0]["model_hash"] == records.params_hash(smollm2.params) and rows[0]["seed"] == "0"
    assert "| full | - | - | 1.000 | 100.0 | 100.0 |" in table
    assert out.with_suffix(".md").read_text().strip() == table.strip()
    assert (tmp_path / "pk_accuracy_passkey.png").stat().st_size > 1000
    assert main(argv + ["--resume"]) == 0  # nothing left to compute: same file
    assert records.read_rows(out) == rows
    (tmp_path / "pk_accuracy_passkey.png").unlink()
    assert main(["plot", str(out)]) == 0 and (tmp_path / "pk_accuracy_passkey.png").is_file()
