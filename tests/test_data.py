"""Evaluation and training data (`kvjax.data`): the resolution order, the generated prose, binary-file
refusal, TFDS sources read for real from a tiny dataset prepared offline, and `kvjax eval` on a fresh
machine (no --haystack / --text, no $KVJAX_DATA, no TFDS data).
"""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

import kvjax
from kvjax import data
from kvjax.cli import main
from kvjax.eval import prompts, records
from kvjax.eval.perplexity import text_chunks
from kvjax.testing import tiny_lm
from kvjax.train import load_tokens

TFDS_NAME = "kvjax_test_texts"
TFDS_TEXTS = ("The first document of the test dataset. It has two sentences.",
              "A second document, shorter.", "The third and last one!")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A data dir holding `kvjax_test_texts` (train split, feature `text`), prepared offline in array_record
    format by a builder that is not registered (read back from its files, as a copied dataset would be)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("tfds")
    with tfds.core.registered.skip_registration():
        class KvjaxTestTexts(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                yield from enumerate({"text": t} for t in TFDS_TEXTS)

    KvjaxTestTexts(data_dir=root, file_format="array_record").download_and_prepare()
    return root


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh machine: no $KVJAX_DATA and an empty TFDS data dir."""
    monkeypatch.delenv("KVJAX_DATA", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    return tmp_path


@pytest.fixture
def tiny(monkeypatch):
    """`kvjax.load` returns a tiny random model, so CLI runs are cheap."""
    lm = tiny_lm(max_positions=512)
    monkeypatch.setattr(kvjax, "load", lambda name, dtype=None: lm)
    return lm


# ------------------------------------------------------------------------------- generated prose
def test_generated_text_is_deterministic_per_seed_and_seeds_differ():
    a = data.generated_text(0, 20_000)
    assert a == data.generated_text(0, 20_000) and len(a) >= 20_000
    assert data.generated_text(0, 60_000).startswith(a)  # a longer text extends a shorter one
    b = data.generated_text(1, 20_000)
    assert a != b and a[:200] != b[:200]


def test_generated_text_reads_like_varied_prose():
    text = data.generated_text(3, 100_000)
    sentences = prompts.split_sentences(text)
    assert len(sentences) > 1000
    assert all(re.fullmatch(r"[A-Z][A-Za-z0-9 ,;']+[.?]", s) for s in sentences), \
        [s for s in sentences if not re.fullmatch(r"[A-Z][A-Za-z0-9 ,;']+[.?]", s)][:3]
    assert len(set(sentences)) > 0.95 * len(sentences)
    assert len(set(text.lower().split())) > 300
    paragraphs = text.split("\n\n")
    assert all(3 <= len(prompts.split_sentences(p)) <= 7 for p in paragraphs)
    for phrase in ("San Francisco", "Dolores", "sandwich", "special magic", "pass key"):  # the needles' words
        assert phrase.lower() not in text.lower()


def test_generated_text_has_a_sane_perplexity_under_the_real_model(smollm2):
    """SmolLM2 finds the generated prose far more predictable than the same words shuffled."""
    def ppl(text):
        ids = smollm2.encode(text)[:512]
        logp = np.asarray(smollm2.logits(ids), np.float64)
        logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
        return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))

    text = data.generated_text(0, 4000)
    words = text.split()
    random.Random(0).shuffle(words)
    prose, shuffled = ppl(text), ppl(" ".join(words))
    assert 1.5 < prose < 60 and shuffled > 3 * prose, (prose, shuffled)


# ------------------------------------------------------------------------------ resolution order
def _layout(root):
    """A $KVJAX_DATA folder and an explicit haystack folder / text file."""
    env = root / "kvjax_data"
    (env / "paul_graham_essays").mkdir(parents=True)
    (env / "paul_graham_essays" / "e.txt").write_text("An essay from the environment. It is short.")
    (env / "wikitext-2").mkdir()
    (env / "wikitext-2" / "test.txt").write_text("Wiki text from the environment.")
    (env / "tinyshakespeare.txt").write_text("First Citizen: Speak, speak.")
    own = root / "own"
    own.mkdir()
    (own / "mine.txt").write_text("My own haystack. Two sentences.")
    return env, own


def test_resolution_order_explicit_env_tfds_generated(fresh, tfds_dir, monkeypatch, capsys):
    env, own = _layout(fresh)
    monkeypatch.setattr(data, "TFDS_DATASETS", (("pg19", "test", "book_text"), (TFDS_NAME, "train", "text")))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    monkeypatch.setenv("KVJAX_DATA", str(env))
    # 1. explicit wins over everything, silently
    assert data.resolve("haystack", own) == data.Corpus(str(own), ("My own haystack. Two sentences.",))
    assert data.resolve("text", own / "mine.txt").label == str(own / "mine.txt")
    assert capsys.readouterr().err == ""
    # 2. $KVJAX_DATA, in its documented layout
    assert data.resolve("haystack").label == str(env / "paul_graham_essays")
    assert data.resolve("text").documents == ("Wiki text from the environment.",)
    assert data.resolve("train").label == str(env / "tinyshakespeare.txt")
    assert f"no --haystack given: using {env / 'paul_graham_essays'}" in capsys.readouterr().err
    # 3. a prepared TFDS dataset (pg19 is not prepared here: skipped without a look), when $KVJAX_DATA is
    #    unset or lacks the entry
    (env / "wikitext-2" / "test.txt").unlink()
    tfds = pytest.importorskip("tensorflow_datasets")
    source = tfds.data_source(TFDS_NAME, split="train", data_dir=tfds_dir, download=False)
    expected = tuple(source[i]["text"].decode() for i in range(len(source)))
    assert sorted(expected) == sorted(TFDS_TEXTS)
    assert data.resolve("text") == data.Corpus(f"tfds:{TFDS_NAME}:train", expected)
    monkeypatch.delenv("KVJAX_DATA")
    assert data.resolve("haystack") == data.Corpus(f"tfds:{TFDS_NAME}:train", expected)
    # 4. generated prose, from the seed
    monkeypatch.setenv("TFDS_DATA_DIR", str(fresh / "empty"))
    corpus = data.resolve("haystack", seed=7)
    assert corpus.label == "generated:seed=7"
    assert "\n\n".join(corpus.documents) == data.generated_text(7, data.CHARS["haystack"])
    assert len("\n\n".join(data.resolve("text", seed=7, min_chars=900_000).documents)) >= 900_000
    assert "using generated:seed=7 (English-like prose" in capsys.readouterr().err


def test_an_unusable_tfds_dataset_falls_through_and_a_bad_kvjax_data_is_an_error(fresh, monkeypatch, capsys):
    (fresh / "tfds" / "pg19" / "0.1.1").mkdir(parents=True)  # a folder, but nothing prepared in it
    monkeypatch.setenv("TFDS_DATA_DIR", str(fresh / "tfds"))
    assert data.resolve("text").label == "generated:seed=0"
    err = capsys.readouterr().err
    assert "using generated:seed=0" in err
    note = [line for line in err.splitlines() if "TFDS dataset pg19 not usable (" in line]
    assert len(note) == 1 and note[0].endswith(")"), err  # one line, whatever tfds raised
    monkeypatch.setenv("KVJAX_DATA", str(fresh / "missing"))
    with pytest.raises(ValueError, match=r"\$KVJAX_DATA='.*missing' is not a folder"):
        data.resolve("haystack")
    with pytest.raises(ValueError, match="unknown data kind 'images'"):
        data.resolve("images")


def test_explicit_sources_keep_their_errors(tmp_path):
    with pytest.raises(ValueError, match="haystack folder .* does not exist"):
        data.resolve("haystack", tmp_path / "missing")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no non-empty .txt file"):
        data.resolve("haystack", tmp_path)
    with pytest.raises(ValueError, match="no text file .*missing.txt"):
        data.resolve("text", tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------- binary files
BINARY = {"nul": b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4,
          "latin-1": "Un café à Paris, déjà vu. ".encode("latin-1") * 50,
          "utf-16": "Plain words in UTF-16.".encode("utf-16")}


@pytest.mark.parametrize("kind", BINARY)
def test_binary_files_are_refused_on_every_path(tmp_path, kind):
    lm = tiny_lm(0)
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "a.txt").write_text("Fine text.")
    bad = tmp_path / "hay" / "b.txt"
    bad.write_bytes(BINARY[kind])
    message = rf"'{re.escape(str(bad))}' is (a binary file|not UTF-8 text)"
    with pytest.raises(ValueError, match=message):  # --haystack
        prompts.read_haystack_dir(tmp_path / "hay")
    with pytest.raises(ValueError, match=message):  # --text
        text_chunks(lm.tokenizer, bad, 8, 8, 1)
    with pytest.raises(ValueError, match=message):  # --data, a file or a folder of them
        load_tokens(bad, lm.tokenizer)
    with pytest.raises(ValueError, match=message):
        load_tokens(tmp_path / "hay", lm.tokenizer)


def test_text_is_not_mistaken_for_binary(tmp_path):
    text = "x" * (data.SNIFF_BYTES - 1) + "é and more text"  # a two-byte character cut at the sniffed prefix
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert data.read_text(tmp_path / "t.txt") == text
    (tmp_path / "late.txt").write_bytes(b"y" * (2 * data.SNIFF_BYTES) + b"\xff")  # past the prefix: replaced
    assert data.read_text(tmp_path / "late.txt").endswith("y\ufffd")
    with pytest.raises(ValueError, match="cannot read .*: Is a directory"):
        data.read_text(tmp_path)


@pytest.mark.parametrize("argv", [["eval", "ppl", "--text", "{bad}"], ["eval", "niah", "--haystack", "{dir}"],
                                  ["eval", "ruler", "--haystack", "{dir}"]])
def test_cli_refuses_a_binary_file_in_one_line(tmp_path, capsys, argv):
    bad = tmp_path / "x.txt"
    bad.write_bytes(BINARY["nul"])
    argv = [a.format(bad=bad, dir=tmp_path) for a in argv] + ["--out", str(tmp_path / "r.csv")]
    assert main(argv) == 2  # before the model loads
    err = capsys.readouterr().err
    assert err == f"kvjax: error: {str(bad)!r} is a binary file (NUL bytes), not UTF-8 text\n"
    assert not (tmp_path / "r.csv").exists()


# ----------------------------------------------------------------------------------------- TFDS
def test_tfds_train_source_reads_a_prepared_dataset(tfds_dir, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    lm = tiny_lm(0)
    ids = load_tokens(f"tfds:{TFDS_NAME}", lm.tokenizer)
    source = tfds.data_source(TFDS_NAME, split="train", data_dir=tfds_dir)
    expected = []
    for i in range(len(source)):
        expected += lm.encode(source[i]["text"].decode()) + [lm.tokenizer.eos_ids[0]]
    assert ids.tolist() == expected and len(source) == len(TFDS_TEXTS)
    with pytest.raises(ValueError, match="give a dataset name"):
        load_tokens("tfds::train", lm.tokenizer)


def test_train_default_data_is_generated_on_a_fresh_machine(fresh):
    lm = tiny_lm(0)
    ids = load_tokens(None, lm.tokenizer, seed=2)
    eos = lm.tokenizer.eos_ids[0]
    paragraphs = data.generated_text(2, data.CHARS["train"]).split("\n\n")
    assert ids.tolist()[: 2 * 200] == (lm.encode(paragraphs[0]) + [eos] + lm.encode(paragraphs[1]) + [eos])[:400]
    assert int((ids == eos).sum()) == len(paragraphs)


# ------------------------------------------------------------------------ kvjax eval, fresh machine
def test_eval_niah_and_ppl_run_on_a_fresh_machine(fresh, tiny, capsys):
    out = fresh / "niah.csv"
    argv = ["eval", "niah", "--lengths", "320", "--depths", "0.5", "--n", "2", "--batch", "2",
            "--max-new-tokens", "4", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    assert "no --haystack given: using generated:seed=0" in capsys.readouterr().err
    rows = records.read_rows(out)
    assert len(rows) == 2 and {json.loads(r["options"])["haystack"] for r in rows} == {"generated:seed=0"}
    assert main(argv + ["--resume"]) == 0 and records.read_rows(out) == rows  # same data: nothing left to do
    assert main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert {json.loads(r["options"])["haystack"] for r in records.read_rows(out)} == {"generated:seed=1"}

    out = fresh / "ppl.csv"
    assert main(["eval", "ppl", "--context-len", "96", "--eval-len", "32", "--n", "2", "--no-plots",
                 "--out", str(out)]) == 0
    rows = records.read_rows(out)
    assert len(rows) == 2 and {json.loads(r["options"])["text"] for r in rows} == {"generated:seed=0"}
    assert all(np.isfinite(float(r["ppl"])) and float(r["ppl"]) > 1 for r in rows)
