"""Method specs: strings and objects to methods, quantizers and `Compose` chains; canonical names.

    get("snapkv")                             # a registered name, default parameters
    get("snapkv(window=16, reduce=mean)")     # parameters (Python literals, else strings)
    get("adakv:snapkv")                       # wrapper:method
    get("kivi-2")                             # a quantizer: name-BITS (or "kivi(bits=2, group=64)")
    get("compose(snapkv(window=16), kivi-2)") # a token method, then a quantizer
    split("compose(snapkv, kivi-4)")          # -> (SnapKV(), KIVI(bits=4))
    spec_of(SnapKV(window=16))                # -> "snapkv(window=16)" (get(spec_of(x)) == x)

Grammar: `compose(SPEC, SPEC)` | `WRAPPER[(k=v, ...)]:SPEC` | `NAME[(k=v, ...)]` | `QUANTIZER-BITS`.
Commas, colons and parentheses inside parentheses, brackets or quotes do not split.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from typing import ClassVar

from kvjax.methods.base import KINDS, TOKEN_KINDS, WRAPPERS, _REGISTRY, lookup

_RAW = re.compile(r"[A-Za-z0-9_./~+\-]+")  # string values written without quotes in canonical specs
_BITS = re.compile(r"(.+)-(\d+)")


def kind_of(obj) -> str | None:
    """"score" | "prefill" | "quantizer" | "compose" for a method object, else None."""
    if isinstance(obj, Compose):
        return "compose"
    kind = getattr(type(obj), "kind", None)
    return kind if kind in KINDS else None


# ------------------------------------------------------------------------------------------ parsing
def split_top(text: str, sep: str = ",") -> list[str]:
    """`text` split at each `sep` outside parentheses, brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"method spec {text!r}: unbalanced parentheses")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError(f"method spec {text!r}: unbalanced {'quotes' if quote else 'parentheses'}")
    parts.append(text[start:])
    return parts


def _call_body(text: str) -> tuple[str, str | None]:
    """"name(body)" -> (name, body); "name" -> (name, None)."""
    text = text.strip()
    if "(" not in text:
        split_top(text)  # a stray ")" is an error
        return text, None
    name, _, rest = text.partition("(")
    if not rest.endswith(")"):
        raise ValueError(f"method spec {text!r}: expected name(key=value, ...)")
    body = rest[:-1]
    split_top(body)  # "a(b)(c)": the first "(" must close at the end
    return name.strip(), body


def parse_call(text: str) -> tuple[str, dict]:
    """"name" -> (name, {}); "name(a=1, b=x, c=(1, 2))" -> (name, {"a": 1, "b": "x", "c": (1, 2)}):
    values are Python literals, else strings."""
    name, body = _call_body(text)
    kwargs: dict = {}
    for item in split_top(body or ""):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"method spec {text.strip()!r}: {item!r} is not key=value")
        if key in kwargs:
            raise ValueError(f"method spec {text.strip()!r}: {key} given twice")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    return name, kwargs


def instantiate(cls, name: str, kwargs: dict):
    try:
        return cls(**kwargs)
    except TypeError as e:
        fields = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
        raise ValueError(f"bad parameters for {name!r} ({e}); its parameters: {fields}") from None


def resolve(text: str) -> tuple[str, dict]:
    """(registered name, parameters) of "name(k=v, ...)", reading "quantizer-BITS" as bits=BITS."""
    name, kwargs = parse_call(text)
    if name not in _REGISTRY:
        bits = quantizer_bits(name, kwargs)
        if bits is not None:
            name, kwargs = bits
    return name, kwargs


def quantizer_bits(name: str, kwargs: dict) -> tuple[str, dict] | None:
    """"kivi-2" -> ("kivi", {"bits": 2, ...}) when the prefix is a registered quantizer, else None."""
    m = _BITS.fullmatch(name)
    if m is None or m[1] not in _REGISTRY or _REGISTRY[m[1]].kind != "quantizer":
        return None
    cls = _REGISTRY[m[1]]
    if "bits" not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{m[1]} has a fixed width; write {m[1]!r}, not {name!r}")
    if "bits" in kwargs:
        raise ValueError(f"{name!r}: bits given twice")
    return m[1], dict(kwargs, bits=int(m[2]))


def get(spec):
    """A method, quantizer or `Compose` from an object (returned as is) or a spec string."""
    if kind_of(spec) is not None:
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"method must be a name or a method object, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("empty method name")
    wrapped = _wrapper_split(text)
    if wrapped:
        head, inner = wrapped
        wrapper, kwargs = parse_call(head)
        if wrapper not in WRAPPERS:
            raise ValueError(f"unknown wrapper {wrapper!r}; known wrappers: {', '.join(sorted(WRAPPERS)) or 'none'}")
        if "press" in kwargs:
            raise ValueError(f"{text!r}: the wrapped method goes after the colon, not in press=")
        return instantiate(WRAPPERS[wrapper], wrapper, dict(kwargs, press=get(inner)))
    name, body = _call_body(text)
    if name == "compose":
        if body is None:
            raise ValueError("compose takes its parts in parentheses: compose(METHOD, QUANTIZER), e.g. "
                             "compose(snapkv, kivi-4)")
        return Compose(parts=tuple(p for p in split_top(body) if p.strip()))
    if text in WRAPPERS:
        raise ValueError(f"{text!r} wraps another method: write it as '{text}:<method>', e.g. '{text}:snapkv'")
    name, kwargs = resolve(text)
    return instantiate(lookup(name), name, kwargs)


def _wrapper_split(text: str) -> tuple[str, str] | None:
    parts = split_top(text, ":")
    if len(parts) == 1:
        return None
    return parts[0].strip(), ":".join(parts[1:])


def split(spec) -> tuple[object | None, object | None]:
    """(token method or None, quantizer or None) of any `method=` value: a name or spec string, a
    method, a quantizer or a `Compose`; None and "full" are (None, None). The caller refuses a
    quantizer here together with a separate quant=."""
    if spec is None or isinstance(spec, str) and spec.strip() == "full":
        return None, None
    obj = get(spec)
    if isinstance(obj, Compose):
        return obj.method, obj.quant
    if kind_of(obj) == "quantizer":
        return None, obj
    return obj, None


# ------------------------------------------------------------------------------------ canonical names
def _fmt(value) -> str:
    if isinstance(value, str) and _RAW.fullmatch(value):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return repr(value)


def _changed(obj, skip=()) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init or f.name in skip:
            continue
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = value
            continue
        try:
            same = bool(value == default)
        except Exception:  # noqa: BLE001 (arrays and the like: written out)
            same = False
        if not same:
            out[f.name] = value
    return out


def _args(kwargs: dict) -> str:
    return f"({','.join(f'{k}={_fmt(v)}' for k, v in kwargs.items())})" if kwargs else ""


def spec_of(obj) -> str:
    """The canonical spec string of a method, quantizer or `Compose`: its registered name plus the
    parameters that differ from their defaults ("snapkv(window=16)", "kivi-4", "adakv:snapkv",
    "compose(snapkv,kivi-4)"); `get(spec_of(x)) == x` for parameters that are literals or plain strings."""
    if isinstance(obj, str):
        return spec_of(get(obj))
    kind = kind_of(obj)
    if kind is None:
        raise ValueError(f"not a method, quantizer or compose: {obj!r}")
    if kind == "compose":
        return obj.name
    wrapper = next((w for w, c in WRAPPERS.items() if type(obj) is c), None)
    if wrapper is not None:
        return f"{wrapper}{_args(_changed(obj, skip=('press',)))}:{spec_of(obj.press)}"
    name = type(obj).name
    changed = _changed(obj)
    if kind == "quantizer" and "bits" in {f.name for f in dataclasses.fields(obj)}:
        rest = {k: v for k, v in changed.items() if k != "bits"}
        if not rest:
            return f"{name}-{obj.bits}"
    return name + _args(changed)


# ------------------------------------------------------------------------------------------ Compose
@dataclasses.dataclass(frozen=True)
class Compose:
    """A token method (score or prefill kind) followed by a quantizer, either optional, as one method
    (kvpress's ComposedPress): evict, then store what is kept quantized.

        Compose(parts=(SnapKV(), KIVI(bits=4)))       # or parts=("snapkv", "kivi-4")
        kvjax.methods.get("compose(snapkv(window=16), kivi-2)")

    A wrapper that acts on what a token method kept (`follows`: ThinK's key channels) may follow the
    token method as its own part: compose(snapkv, think, kivi-4) holds think:snapkv, then kivi-4.

    `parts` may hold objects or spec strings (resolved here); every structural error (empty, two
    token methods, two quantizers, a quantizer first, a nested compose, an unknown name) is a one-line
    ValueError raised at construction. Hashable: a static argument of jitted functions.
    """

    parts: tuple = ()
    kind: ClassVar[str] = "compose"

    def __post_init__(self):
        parts = self.parts
        if isinstance(parts, str) or not isinstance(parts, (tuple, list)):
            raise ValueError(f"Compose(parts=...) takes a tuple of methods and quantizers, got {parts!r}")
        shown = "compose(" + ", ".join(p.strip() if isinstance(p, str) else _shown(p) for p in parts) + ")"
        if not parts or all(isinstance(p, str) and not p.strip() for p in parts):
            raise ValueError("compose() is empty: give a token method and/or a quantizer, e.g. compose(snapkv, kivi-4)")
        resolved = []
        for p in parts:
            try:
                obj = _part(p)
            except ValueError as e:
                raise ValueError(f"{shown}: {e}") from None
            if getattr(type(obj), "follows", False) and getattr(obj, "press", None) is None:
                # a method that acts on what the previous token method kept (ThinK's channels after
                # SnapKV's tokens): folded around it, so the compose still holds one token method
                if not resolved or kind_of(resolved[-1]) not in TOKEN_KINDS:
                    name = next(w for w, c in WRAPPERS.items() if type(obj) is c)
                    raise ValueError(f"{shown}: {name} follows a token method, e.g. compose(snapkv, {name})")
                obj = dataclasses.replace(obj, press=resolved.pop())
            resolved.append(obj)
        kinds = [kind_of(o) for o in resolved]
        if "compose" in kinds:
            raise ValueError(f"{shown}: a compose inside a compose; write one compose(method, quantizer)")
        tokens = [o for o, k in zip(resolved, kinds) if k in TOKEN_KINDS]
        quants = [o for o, k in zip(resolved, kinds) if k == "quantizer"]
        if len(quants) > 1:
            raise ValueError(f"{shown}: two quantizers ({', '.join(spec_of(q) for q in quants)}); a compose holds "
                             "at most one quantizer, after at most one token method")
        if len(tokens) > 1:
            raise ValueError(f"{shown}: two token methods ({', '.join(spec_of(t) for t in tokens)}); a compose holds "
                             "at most one eviction method, then at most one quantizer")
        if tokens and quants and kinds.index("quantizer") < kinds.index(kind_of(tokens[0])):
            raise ValueError(f"{shown}: the quantizer {spec_of(quants[0])} comes before the method "
                             f"{spec_of(tokens[0])}; write compose({spec_of(tokens[0])}, {spec_of(quants[0])}) "
                             "(evict, then quantize)")
        object.__setattr__(self, "parts", tuple(resolved))

    @property
    def name(self) -> str:
        """The canonical spec, e.g. "compose(snapkv,kivi-4)"."""
        return "compose(" + ",".join(spec_of(p) for p in self.parts) + ")"

    @property
    def method(self):
        """The token method (score or prefill kind), or None."""
        return next((p for p in self.parts if kind_of(p) in TOKEN_KINDS), None)

    @property
    def quant(self):
        """The quantizer, or None."""
        return next((p for p in self.parts if kind_of(p) == "quantizer"), None)


def _part(p):
    """A compose part: a spec or object (`get`), or a bare follow-up wrapper ("think(key_ratio=0.5)"),
    built without its inner method (the compose supplies the part before it)."""
    if isinstance(p, str) and _wrapper_split(p.strip()) is None:
        name, _ = _call_body(p)
        if getattr(WRAPPERS.get(name), "follows", False):
            return instantiate(WRAPPERS[name], name, parse_call(p)[1])
    return get(p)


def _shown(obj) -> str:
    try:
        return spec_of(obj)
    except Exception:  # noqa: BLE001 (for error messages only)
        return repr(obj)


__all__ = ["Compose", "get", "split", "spec_of", "parse_call", "split_top", "kind_of"]
