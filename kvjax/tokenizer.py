"""Text <-> token ids, and chat templates, for the models kvjax runs.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (which does the BPE) and builds it from
either source a model can come in:

* a GGUF file's metadata (`from_gguf_metadata`): byte-level BPE vocabularies
  (`tokenizer.ggml.model == "gpt2"`), or SentencePiece BPE ("llama": `kvjax.spm`, Gemma 3). A GGUF does
  not store its pre-tokenizer regex, only a name (`tokenizer.ggml.pre`) for one that llama.cpp
  compiles in (`llm_tokenizer_bpe` in llama.cpp's src/llama-vocab.cpp); we rebuild the ones named in
  `PRE_TOKENIZERS` from the regexes of the models' own `tokenizer.json`. Control (3) and
  user-defined (4) tokens become added tokens, matched whole in the text, as llama.cpp and
  transformers do.
* a Hugging Face model directory (`from_hf_dir`): `tokenizer.json`, `tokenizer_config.json` and,
  if present, `generation_config.json` / `chat_template.jinja`.

`encode` never runs the post-processor (Llama 3's would add BOS); it adds BOS iff the model says
`add_bos_token`. Chat templates are rendered with Jinja the way transformers renders them.

Input rules (each break is a ValueError): `encode` takes a str that is valid Unicode (a str holding
undecodable bytes, as Python makes of non-UTF-8 command-line arguments, is refused); whitespace is
text and encodes like any other (the CLI refuses a prompt that is only whitespace); `decode` takes
ids in [0, vocab_size); a chat message's role is one of `CHAT_ROLES` or a role the model's template
names in quotes (e.g. Llama 3.1's 'ipython').
"""
from __future__ import annotations

import json
import operator
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import tokenizers
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from kvjax.spm import SentencePieceBPE

# From the Llama 3 and Qwen2 tokenizer.json (llama.cpp runs a hand-expanded copy of each).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# `tokenizer.ggml.pre` -> pre-tokenizer. A missing value means llama.cpp's "default" (GPT-2).
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2, "gpt2": _gpt2, "smollm": _smollm,
    "llama3": _split_then_bytes(_LLAMA3_SPLIT), "llama-v3": _split_then_bytes(_LLAMA3_SPLIT),
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT), "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}  # llama.cpp: whole-word vocab hits skip BPE
CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles of transformers' chat format
_MARK = "\x00USER\x00"  # stands for the user message in `chat_frame`
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """A model's tokenizer: `encode`/`decode` text, and `chat` to render and encode a conversation."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: Sequence[int],
                 pad_id: int | None, add_bos: bool, chat_template: str | None):
        self._tk = backend
        self._bos_id = bos_id
        self._eos_ids = tuple(dict.fromkeys(eos_ids))
        self._pad_id = pad_id if pad_id is not None else (self._eos_ids[0] if self._eos_ids else None)
        self._add_bos = add_bos and bos_id is not None
        self._chat_template = chat_template

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama":
            return cls._from_gguf_sentencepiece(meta)
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level "
                             "BPE), 'llama' (SentencePiece BPE)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; "
                             f"supported: {sorted(PRE_TOKENIZERS)}")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _IGNORE_MERGES)
        tk = tokenizers.Tokenizer(bpe)
        tk.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tk.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type", ())
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == _CONTROL])
        tk.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(tk, bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_ids=eos,
                   pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def _from_gguf_sentencepiece(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """SentencePiece BPE from the GGUF's tokens, scores and types (`kvjax.spm`: Gemma 3)."""
        missing = [k for k in ("tokens", "scores", "token_type") if f"tokenizer.ggml.{k}" not in meta]
        if missing:
            raise ValueError(f"GGUF SentencePiece tokenizer lacks {', '.join('tokenizer.ggml.' + k for k in missing)}")
        backend = SentencePieceBPE(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                   meta["tokenizer.ggml.token_type"], meta.get("tokenizer.ggml.unknown_token_id"),
                                   add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        return cls(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_ids=eos,
                   pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {root}")
        tk = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        cfg = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")

        def token_id(tok: Any) -> int | None:  # config tokens are a str, {"content": str} or null
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return tk.token_to_id(tok) if tok else None

        bos_id = token_id(cfg.get("bos_token"))
        eos = [token_id(cfg.get("eos_token"))]
        gen_eos = gen.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # not stated: do what the post-processor would (Llama 3 adds BOS there)
            add_bos = bos_id is not None and tk.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        template = cfg.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # older multi-template form: [{"name", "template"}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(tk, bos_id=bos_id, eos_ids=[e for e in eos if e is not None],
                   pad_id=token_id(cfg.get("pad_token")), add_bos=bool(add_bos), chat_template=template)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (a model's embedding table may be larger)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def pad_id(self) -> int | None:
        """The model's pad token, else its first EOS (the usual stand-in), else None."""
        return self._pad_id

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. "<|im_end|>") become their ids. The
        model's BOS starts them where its tokenizer adds one, unless `add_special_tokens` is False (a
        piece of a longer prompt)."""
        return ([self._bos_id] if self._add_bos and add_special_tokens else []) + self._encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; an id outside [0, vocab_size) is a ValueError."""
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as e:
            raise ValueError(f"token ids must be integers: {e}") from e
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} outside [0, {self.vocab_size})")
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes Python could not decode as UTF-8
            raise ValueError(f"text is not valid UTF-8: undecodable bytes at character {e.start} "
                             f"({text[max(e.start - 20, 0):e.start]!r} precedes them); give UTF-8 text") from None
        return self._tk.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat as text, rendered with the model's Jinja template."""
        if self._chat_template is None:
            raise ValueError("this model has no chat template")
        if not isinstance(messages, list) or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError('messages must be a list of {"role": str, "content": str} dicts')
        for m in messages:
            role = m["role"]
            if role not in CHAT_ROLES and f"'{role}'" not in self._chat_template \
                    and f'"{role}"' not in self._chat_template:
                raise ValueError(f"unknown chat role {role!r}: expected one of {', '.join(CHAT_ROLES)} "
                                 "(or a role the model's chat template names)")

        def token(i: int | None) -> str:
            return self._tk.id_to_token(i) if i is not None else ""

        return _compile_template(self._chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=token(self._bos_id), eos_token=token(self._eos_ids[0] if self._eos_ids else None))

    def chat(self, messages: list[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat; no BOS is added, since templates write it themselves."""
        return self._encode(self.apply_chat_template(messages, add_generation_prompt))

    def chat_frame(self) -> tuple[str, str]:
        """(text before, text after) a single user message in the chat template, the generation prompt
        (assistant header) included in the second. A model without a chat template (a base model, such
        as the gemma3-270m GGUF) gets plain text: nothing before, a line break after (kvpress's rule)."""
        if not self.has_chat_template:
            return "", "\n"
        before, after = self.apply_chat_template([{"role": "user", "content": _MARK}], True).split(_MARK)
        return before, after


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _compile_template(source: str):
    """Jinja set up as transformers does for chat templates (sandboxed, trim/lstrip blocks)."""
    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:  # Jinja's own tojson HTML-escapes
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)
