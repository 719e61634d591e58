"""Tokenizer tests: a tiny hand-made byte-level BPE, and the real SmolLM2 tokenizer against golden ids
produced by transformers (tests/golden/smollm2-135m/tokenizer_cases.json)."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from kvjax.gguf_io import open_gguf, read_metadata
from kvjax.tokenizer import PRE_TOKENIZERS, Tokenizer

GOLDEN = Path(__file__).parent / "golden" / "smollm2-135m" / "tokenizer_cases.json"

# SmolLM2-135M-Instruct's template, verbatim.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"]
TEXTS = ["hello world", "", "  two  spaces\n\ttab", "naïve café 日本 🤖", "x=12; y=3.5", "hellohello"]


def tiny_meta(**overrides):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + alphabet + merged + ["<think>"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(alphabet) + len(merged)) + [4],
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    meta.update(overrides)
    return meta


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_meta())


def tid(tok: Tokenizer, piece: str) -> int:
    return tok._tk.token_to_id(piece)


# ---------------------------------------------------------------------------- tiny vocabulary
def test_properties(tiny):
    assert tiny.vocab_size == len(SPECIALS) + 256 + len(MERGES) + 1
    assert (tiny.bos_id, tiny.eos_ids, tiny.pad_id) == (1, (2,), 2)  # no pad id given: first EOS


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_merges_apply(tiny):
    assert tiny.encode("hello") == [tid(tiny, "hello")]
    assert tiny.encode(" world") == [tid(tiny, t) for t in ["Ġw", "o", "r", "l", "d"]]


def test_digits_split_individually_for_smollm(tiny):
    assert tiny.encode("12") == [tid(tiny, "1"), tid(tiny, "2")]
    gpt2 = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.pre": "gpt2"}))
    assert gpt2.encode("12") == [tid(gpt2, "12")]


def test_special_and_user_defined_tokens_stay_whole(tiny):
    ids = tiny.encode("hello<|im_end|><think>")
    assert ids == [tid(tiny, "hello"), 2, tid(tiny, "<think>")]
    assert tiny.decode(ids) == "hello<|im_end|><think>"
    assert tiny.decode(ids, skip_special_tokens=True) == "hello<think>"


def test_bos_only_when_asked():
    tok = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello") == [1, tid(tok, "hello")]
    assert tok.chat([{"role": "user", "content": "hi"}])[0] == tid(tok, "<|im_start|>")  # template's own


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_round_trips(pre):
    tok = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.pre": pre}))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_llama3_splits_digits_in_threes():
    pieces = [p for p, _ in PRE_TOKENIZERS["llama3"]().pre_tokenize_str("12345 it's")]
    assert pieces == ["123", "45", "Ġit", "'s"]


def test_chat_template(tiny):
    msgs = [{"role": "user", "content": "hi"}]
    text = tiny.apply_chat_template(msgs)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert not tiny.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    assert tiny.chat(msgs) == tiny.encode(text)
    assert tiny.chat(msgs).count(tid(tiny, "<|im_start|>")) == 3


def test_template_context():
    template = ("{{ bos_token }}|{{ eos_token }}"
                "{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}")
    tok = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "<|im_start|>|<|im_end|>"
    with pytest.raises(jinja2.TemplateError, match="one only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


@pytest.mark.parametrize("bad", [123, None, b"bytes", ["list"]])
def test_encode_rejects_non_str(tiny, bad):
    with pytest.raises(ValueError):
        tiny.encode(bad)


def test_encode_rejects_undecodable_text_and_keeps_whitespace(tiny):
    # Python decodes a non-UTF-8 command-line argument (or a file read with errors="surrogateescape")
    # to lone surrogates, which the BPE cannot take
    undecodable = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")
    with pytest.raises(ValueError, match="not valid UTF-8: undecodable bytes at character 3 \\('caf'"):
        tiny.encode(undecodable)
    assert tiny.decode(tiny.encode(" \n\t ")) == " \n\t "  # whitespace is text


def test_chat_roles(tiny):
    for role in ("system", "user", "assistant", "tool"):
        assert tiny.chat([{"role": role, "content": "hi"}])
    with pytest.raises(ValueError, match="unknown chat role 'bot': expected one of system, user, assistant, tool"):
        tiny.chat([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}])
    # a role the template names (Llama 3.1's tool results) is known to that model
    template = "{% for m in messages %}{% if m['role'] == 'ipython' %}[tool]{% endif %}{{ m['content'] }}{% endfor %}"
    tok = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template([{"role": "ipython", "content": "42"}]) == "[tool]42"
    with pytest.raises(ValueError, match="unknown chat role 'ipython'"):
        tiny.chat([{"role": "ipython", "content": "42"}])


@pytest.mark.parametrize("bad", [[-1], [10**6], [0, 1.5], ["a"]])
def test_decode_rejects_bad_ids(tiny, bad):
    with pytest.raises(ValueError):
        tiny.decode(bad)
    with pytest.raises(ValueError):
        tiny.decode([tiny.vocab_size])


@pytest.mark.parametrize("bad", [
    {"role": "user", "content": "hi"},
    [{"role": "user"}],
    [{"content": "hi"}],
    [("user", "hi")],
    [{"role": "user", "content": 3}],
])
def test_chat_rejects_bad_messages(tiny, bad):
    with pytest.raises(ValueError):
        tiny.chat(bad)


def test_no_template():
    meta = tiny_meta()
    del meta["tokenizer.chat_template"]
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer.from_gguf_metadata(meta).chat([{"role": "user", "content": "hi"}])


def test_unsupported_metadata():
    with pytest.raises(ValueError, match="'ugm' is not supported; supported: 'gpt2'.*'llama'"):
        Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.model": "ugm"}))
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.scores"):  # SentencePiece needs the scores
        Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="smollm"):
        Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.pre": "made-up"}))


# ---------------------------------------------------------------------------- Hugging Face directory
def write_hf_dir(root: Path, config: dict, generation_config: dict | None = None) -> None:
    """A Llama-3-shaped tokenizer.json: byte-level BPE whose post-processor prepends BOS."""
    meta = tiny_meta()
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    tk = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in MERGES]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                      special_tokens=[("<|im_start|>", 1)])
    tk.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (root / "generation_config.json").write_text(json.dumps(generation_config))


def test_from_hf_dir(tmp_path):
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": CHATML}
    write_hf_dir(tmp_path, config, {"eos_token_id": [2, 0]})
    tok = Tokenizer.from_hf_dir(tmp_path)
    gguf = Tokenizer.from_gguf_metadata(tiny_meta())
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2, 0), 2)
    assert tok.encode("hello world") == [1] + gguf.encode("hello world")  # BOS from the post-processor's rule
    assert tok.chat([{"role": "user", "content": "hi"}]) == gguf.chat([{"role": "user", "content": "hi"}])
    assert tok.decode(tok.encode("naïve 🤖")) == "<|im_start|>naïve 🤖"


def test_from_hf_dir_add_bos_false(tmp_path):
    write_hf_dir(tmp_path, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False})
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("hello") == [tid(tok, "hello")]
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_hf_dir_missing(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------------------- real SmolLM2 vs transformers
@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(smollm2_gguf_path)))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())  # committed; made by tests/golden/make_golden.py


def test_smollm2_special_ids(smollm2_tok):
    tok = smollm2_tok
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.pad_id) == (49152, 1, (2,), 2)


def test_smollm2_text_matches_golden(smollm2_tok, golden):
    assert golden["text"]
    for case in golden["text"]:
        assert smollm2_tok.encode(case["text"]) == case["ids"], case["text"]
        assert smollm2_tok.decode(smollm2_tok.encode(case["text"])) == case["text"], case["text"]


def test_smollm2_chat_matches_golden(smollm2_tok, golden):
    assert golden["chat"]
    for case in golden["chat"]:
        ids = smollm2_tok.chat(case["messages"], case["add_generation_prompt"])
        assert ids == case["ids"], case["messages"]


def test_lm_decode_skips_no_token_and_refuses_ids_outside_the_vocabulary():
    from kvjax.testing import tiny_lm
    lm = tiny_lm(seed=0)
    ids = lm.encode("hello")
    assert lm.decode([-1, *ids, -1]) == lm.decode(ids)  # -1: "no token" (stopped rows)
    for bad in (-2, lm.cfg.vocab_size, 10**9):
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            lm.decode([*ids, bad])
