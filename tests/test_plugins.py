"""Method kinds in one registry, `Compose` and spec parsing, user plugins (`--import`, register_method).

Tiny random model everywhere; the CLI runs `kvjax eval ppl` on it (`kvjax.load` monkeypatched).
"""
from __future__ import annotations

import dataclasses
import sys
import textwrap

import jax
import numpy as np
import pytest

import kvjax
from kvjax import methods, quantizers
from kvjax.cli import main
from kvjax.eval import records
from kvjax.methods import Compose, PrefillMethod, ScoreMethod, SnapKV, StreamingLLM, spec_of, split
from kvjax.methods import base
from kvjax.quantizers import KIVI, Int8, PerToken
from kvjax.testing import random_ids, tiny_lm

TEXT = ("Alpha beta gamma delta. Epsilon zeta eta theta iota! Kappa lambda mu? Nu xi omicron pi rho sigma. "
        "Tau upsilon phi chi psi omega. ") * 4

# keeps the most recent tokens: the same kept set as streaming_llm(n_sink=0)
RECENT = '''
"""A test plugin: keep the most recent tokens."""
import dataclasses

import jax.numpy as jnp

import kvjax


@kvjax.register_method("{name}")
@dataclasses.dataclass(frozen=True, kw_only=True)
class {cls}(kvjax.methods.ScoreMethod):
    """Keep the most recent tokens (a plugin)."""

    bias: float = 0.0

    def score(self, ctx):
        return ctx.pos.astype(jnp.float32) + self.bias
'''

INT8 = '''
import dataclasses

import kvjax
from kvjax import quant


@kvjax.register_quantizer("my_int8")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MyInt8(kvjax.quantizers.Quantizer):
    """int8 per token, written as a plugin."""

    residual: int = 32

    def quantize_keys(self, k, pos):
        return quant.quantize_int8(k, axis=-1)

    def quantize_values(self, v):
        return quant.quantize_int8(v, axis=-1)
'''


@pytest.fixture(autouse=True)
def isolated():
    """Every test starts and ends with kvjax's own registry and no plugin module loaded."""
    registry, modules = dict(base._REGISTRY), set(sys.modules)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(registry)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(max_positions=512)


def write(tmp_path, stem: str, source: str):
    path = tmp_path / f"{stem}.py"
    path.write_text(textwrap.dedent(source))
    return path


def recent_plugin(tmp_path, stem="recent_press", name="recent_press", cls="RecentPress"):
    return write(tmp_path, stem, RECENT.replace("{name}", name).replace("{cls}", cls))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    assert err.startswith("kvjax: error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


# ------------------------------------------------------------------------------------------- kinds
def test_kinds_share_one_registry():
    assert methods.SnapKV.kind == "score" and methods.AdaKV.kind == "score"
    assert methods.Locret.kind == "prefill" and methods.Matryoshka.kind == "prefill"
    assert issubclass(methods.Locret, PrefillMethod) and issubclass(PrefillMethod, ScoreMethod)
    assert ScoreMethod is methods.EvictionMethod and methods.Locret.prefills_itself and not SnapKV.prefills_itself
    assert KIVI.kind == "quantizer" and Int8.kind == "quantizer"
    # methods.registry(): what method= takes (score and prefill); quantizers by kind
    assert set(methods.registry()) == set(methods.registry("score")) | set(methods.registry("prefill"))
    assert "locret" in methods.registry("prefill") and "snapkv" in methods.registry("score")
    assert methods.registry("quantizer") == quantizers.registry() and "kivi" in quantizers.registry()
    assert not set(methods.registry()) & set(quantizers.registry())
    # every kind by name, from either entry point
    assert methods.get("kivi-2") == KIVI(bits=2) == quantizers.get("kivi-2")
    assert methods.get("per_token-8") == PerToken(bits=8)
    assert methods.get("kivi(bits=4, group=64)") == KIVI(bits=4, group=64) == quantizers.get("kivi(bits=4,group=64)")
    assert methods.get("int8") == Int8()
    assert methods.get("h2o") == methods.ObservedAttention()
    with pytest.raises(ValueError, match="int8 has a fixed width"):
        methods.get("int8-4")
    with pytest.raises(ValueError, match="'snapkv' is a score method, not a quantizer"):
        quantizers.get("snapkv")
    with pytest.raises(ValueError, match="unknown kind"):
        methods.registry("eviction")


def test_prefill_method_base():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Builds(PrefillMethod):
        depth: int = 2

    m = Builds()
    assert hash(m) == hash(Builds()) and m == Builds() and m != Builds(depth=3)
    with pytest.raises(ValueError, match="prefill method"):
        m.score(None)
    with pytest.raises(ValueError, match="defines no build_cache"):
        m.build_cache(None, None, 1, 8, 8)
    assert dataclasses.is_dataclass(PrefillMethod) and hash(methods.Locret()) == hash(methods.Locret())
    with pytest.raises(TypeError):  # a prefill method is frozen (it is a static argument of jitted code)
        @dataclasses.dataclass
        class Mutable(PrefillMethod):
            x: int = 0


def test_kvjax_methods_lists_each_kind_in_its_own_section(capsys):
    rc, out, _ = run_cli(["methods"], capsys)
    assert rc == 0
    heads = [out.index(h) for h in ("score methods (", "\nprefill methods (", "\nquantizers (", "\nwrappers (",
                                    "\ncompose (")]
    assert heads == sorted(heads)
    score, prefill, quant = out[heads[0]:heads[1]], out[heads[1]:heads[2]], out[heads[2]:heads[3]]
    assert "  snapkv " in score and "  locret " in prefill and "  kivi " in quant and "  int8 " in quant
    assert "  locret " not in score and "  kivi " not in score
    assert "bits=2, group=32, residual=128" in quant


# ------------------------------------------------------------------------------------ spec parsing
def test_parse_call_nested():
    assert methods.parse_call("snapkv") == ("snapkv", {})
    assert methods.parse_call("f(a=(1, 2), b='x,y', c=mean, d=[1, (2, 3)], e=-0.5)") == (
        "f", {"a": (1, 2), "b": "x,y", "c": "mean", "d": [1, (2, 3)], "e": -0.5})
    assert methods.parse_call("f()") == ("f", {})
    for bad, match in [("snapkv(16)", "not key=value"), ("snapkv(window=1, window=2)", "given twice"),
                       ("snapkv(window=16", "unbalanced"), ("snapkv(window=16))", "unbalanced"),
                       ("snapkv(window=(16)", "unbalanced"), ("snapkv(a)(b)", "unbalanced"),
                       ("snapkv(reduce='mean)", "unbalanced quotes")]:
        with pytest.raises(ValueError, match=match):
            methods.get(bad)


def test_compose_parsing_and_canonical_names():
    c = Compose(parts=(SnapKV(), KIVI(bits=4)))
    assert c.name == "compose(snapkv,kivi-4)" and c.method == SnapKV() and c.quant == KIVI(bits=4)
    assert methods.get("compose(snapkv, kivi-4)") == c == Compose(parts=("snapkv", "kivi-4"))
    assert methods.get(" compose( snapkv ,kivi-4 ) ") == c
    nested = methods.get("compose(snapkv(window=16, reduce=sum), kivi(bits=4, group=64))")
    assert nested == Compose(parts=(SnapKV(window=16, reduce="sum"), KIVI(bits=4, group=64)))
    assert nested.name == "compose(snapkv(window=16,reduce=sum),kivi(bits=4,group=64))"
    assert methods.get(nested.name) == nested
    ada = methods.get("compose(adakv:snapkv(window=8), int8)")
    assert ada.method == methods.AdaKV(SnapKV(window=8)) and ada.quant == Int8()
    assert ada.name == "compose(adakv:snapkv(window=8),int8)"
    assert methods.get("compose(snapkv)").quant is None and methods.get("compose(kivi-2)").method is None
    # hashable and equal by value: a static argument of jitted functions
    assert hash(c) == hash(methods.get("compose(snapkv,kivi-4)")) and {c: 1}[Compose(parts=("snapkv", "kivi-4"))] == 1
    calls = []
    g = jax.jit(lambda x, m: (calls.append(m), x)[1], static_argnames="m")
    g(1.0, m=c)
    g(1.0, m=methods.get("compose(snapkv, kivi-4)"))
    assert len(calls) == 1  # one trace: equal composes are the same static argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.parts = ()


@pytest.mark.parametrize("obj", [SnapKV(), SnapKV(window=16, reduce="sum"), methods.PyramidKV(beta=10),
                                 methods.AdaKV(SnapKV(window=8), alpha_safeguard=0.1), StreamingLLM(n_sink=0),
                                 methods.Locret(stabilizers=0.25, checkpoint="/runs/locret:v2"), KIVI(),
                                 KIVI(bits=4, group=64), Int8(residual=64), quantizers.KVQuant(bits=4),
                                 Compose(parts=(methods.Knorm(), PerToken(bits=2)))])
def test_spec_of_round_trips(obj):
    assert methods.get(spec_of(obj)) == obj


def test_split_every_method_value():
    assert split(None) == (None, None) and split("full") == (None, None)
    assert split("snapkv") == (SnapKV(), None)
    assert split(SnapKV(window=8)) == (SnapKV(window=8), None)
    assert split("kivi-2") == (None, KIVI(bits=2)) and split(Int8()) == (None, Int8())
    assert split("compose(snapkv(window=16), kivi-2)") == (SnapKV(window=16), KIVI(bits=2))
    assert split(Compose(parts=("locret",))) == (methods.Locret(), None)
    assert split("compose(per_token-4)") == (None, PerToken(bits=4))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        split("nope")


@pytest.mark.parametrize("spec, message", [
    ("compose()", "compose() is empty"),
    ("compose", "compose takes its parts in parentheses"),
    ("compose(kivi-2, snapkv)", "the quantizer kivi-2 comes before the method snapkv"),
    ("compose(snapkv, knorm)", "two token methods (snapkv, knorm)"),
    ("compose(snapkv, locret)", "two token methods"),
    ("compose(kivi-2, int8)", "two quantizers (kivi-2, int8)"),
    ("compose(snapkv, compose(knorm, int8))", "a compose inside a compose"),
    ("compose(snapkv, nope)", "compose(snapkv, nope): unknown method 'nope'"),
    ("compose(snapkv(foo=1), int8)", "bad parameters for 'snapkv'"),
    ("compose(snapkv, int8-4)", "int8 has a fixed width"),
])
def test_bad_compose_is_one_line_at_construction(spec, message):
    with pytest.raises(ValueError) as e:
        methods.get(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_compose_objects():
    with pytest.raises(ValueError, match="two quantizers"):
        Compose(parts=(KIVI(), Int8()))
    with pytest.raises(ValueError, match="comes before"):
        Compose(parts=(KIVI(), SnapKV()))
    with pytest.raises(ValueError, match="is empty"):
        Compose(parts=())
    with pytest.raises(ValueError, match="takes a tuple"):
        Compose(parts="snapkv")
    with pytest.raises(ValueError, match="method must be a name or a method object, got int"):
        Compose(parts=(SnapKV(), 3))


# ------------------------------------------------------------------------------------ registration
def test_register_rules():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Mine(ScoreMethod):
        def score(self, ctx):
            return ctx.pos.astype("float32")

    assert kvjax.register_method("mine", "mine_alias")(Mine) is Mine and Mine.name == "mine"
    assert kvjax.methods.register is kvjax.register_method is methods.register_method
    assert methods.get("mine_alias") == Mine() and methods.registry()["mine"] is Mine
    assert kvjax.register_method("mine")(Mine) is Mine  # the identical class again: a no-op

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Other(ScoreMethod):
        def score(self, ctx):
            return ctx.pos.astype("float32")

    with pytest.raises(ValueError, match=r"name 'mine' registered twice: .*test_register_rules.<locals>.Mine and "
                                         r".*test_register_rules.<locals>.Other"):
        kvjax.register_method("mine")(Other)
    with pytest.raises(ValueError, match=r"name 'snapkv' registered twice: kvjax.methods.snapkv.SnapKV and"):
        kvjax.register_method("snapkv")(Other)
    with pytest.raises(ValueError, match="name 'kivi' registered twice"):  # one namespace for every kind
        kvjax.register_method("kivi")(Other)
    for word in ("compose", "full", "adakv"):
        with pytest.raises(ValueError, match="reserved"):
            kvjax.register_method(word)(Other)
    with pytest.raises(ValueError, match="letters, digits and _"):
        kvjax.register_method("my-press")
    with pytest.raises(ValueError, match="not a subclass of kvjax.quantizers.Quantizer"):
        kvjax.register_quantizer("other")(Other)
    with pytest.raises(ValueError, match="not a subclass of kvjax.methods.ScoreMethod"):
        kvjax.register_method("q")(KIVI)

    class NotADataclass(ScoreMethod):
        def score(self, ctx):
            return ctx.pos

    @dataclasses.dataclass
    class Mutable(ScoreMethod):
        def score(self, ctx):
            return ctx.pos

    for cls in (NotADataclass, Mutable):
        with pytest.raises(ValueError, match="must be a frozen dataclass"):
            kvjax.register_method("loose")(cls)
    assert "other" not in methods.registry() and "loose" not in methods.registry()
    assert methods.unregister("mine_alias") is Mine and "mine" not in methods.registry()


# ------------------------------------------------------------------------------------------ plugins
def test_user_score_method_from_the_api(lm, tmp_path):
    path = recent_plugin(tmp_path)
    module = kvjax.plugins.load_plugin(path)
    assert module.__name__ == "kvjax_plugin_recent_press" and sys.modules["kvjax_plugin_recent_press"] is module
    assert kvjax.plugins.load_plugin(str(path)) is module  # loaded once: no "registered twice"
    assert methods.registry()["recent_press"] is module.RecentPress and module.RecentPress.kind == "score"
    ids = random_ids(40, 1).tolist()
    cache = lm.prefill(ids, method="recent_press", ratio=0.5)
    for layer in kvjax.kept_positions(cache):
        np.testing.assert_array_equal(layer, np.broadcast_to(np.arange(20, 40), layer.shape))
    mine = lm.generate(ids, method="recent_press", ratio=0.5, max_new_tokens=6)
    ref = lm.generate(ids, method="streaming_llm(n_sink=0)", ratio=0.5, max_new_tokens=6)
    assert mine.ids == ref.ids and mine.cache_bytes == ref.cache_bytes
    obj = methods.get("recent_press(bias=1.5)")
    assert obj.bias == 1.5 and spec_of(obj) == "recent_press(bias=1.5)"
    assert lm.generate(ids, method=module.RecentPress(), ratio=0.5, max_new_tokens=6).ids == ref.ids


def test_user_plugin_by_module_name(tmp_path, monkeypatch):
    recent_plugin(tmp_path, stem="mylab_presses", name="mylab_recent", cls="Recent")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = kvjax.plugins.load_plugin("mylab_presses")
    assert methods.registry()["mylab_recent"] is module.Recent


def test_user_method_on_the_cli_eval_ppl(lm, tmp_path, monkeypatch, capsys):
    path = recent_plugin(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    monkeypatch.setattr(kvjax, "load", lambda *a, **k: lm)
    out = tmp_path / "ppl.csv"
    rc, stdout, err = run_cli(["eval", "ppl", "--import", path, "--method", "recent_press", "streaming_llm(n_sink=0)",
                               "--ratio", "0.5", "--text", text, "--context-len", 32, "--eval-len", 8, "--n", 2,
                               "--batch", 2, "--no-plots", "--out", out], capsys)
    assert rc == 0, err
    rows = records.read_rows(out)
    mine = [r for r in rows if r["method"] == "recent_press"]
    ref = [r for r in rows if r["method"] == "streaming_llm(n_sink=0)"]
    assert len(mine) == len(ref) == 2
    for a, b in zip(mine, ref):
        assert float(a["nll"]) == pytest.approx(float(b["nll"]), abs=1e-6)
        assert a["cache_bytes"] == b["cache_bytes"]
    assert "recent_press" in stdout
    rc, stdout, _ = run_cli(["methods", "--import", path], capsys)
    assert rc == 0 and "  recent_press " in stdout and "Keep the most recent tokens (a plugin)." in stdout


def test_user_quantizer(tmp_path, capsys):
    module = kvjax.plugins.load_plugin(write(tmp_path, "my_int8_plugin", INT8))
    q = module.MyInt8()
    assert quantizers.get("my_int8") == q == methods.get("my_int8")
    assert quantizers.registry()["my_int8"] is module.MyInt8 and "my_int8" not in methods.registry()
    assert quantizers.get("my_int8(residual=64)").residual == 64
    assert split("compose(snapkv, my_int8)") == (SnapKV(), q) and split("my_int8") == (None, q)
    with pytest.raises(ValueError, match="my_int8 has a fixed width"):
        quantizers.get("my_int8-4")
    rc, out, _ = run_cli(["methods", "--import", tmp_path / "my_int8_plugin.py"], capsys)
    quant = out[out.index("\nquantizers ("):out.index("\nwrappers (")]
    assert rc == 0 and "  my_int8 " in quant and "int8 per token, written as a plugin." in quant


def test_user_quantizer_generates_like_int8(tmp_path):
    kvjax.plugins.load_plugin(write(tmp_path, "my_int8_gen", INT8))
    lm = tiny_lm(seed=1)
    ids = random_ids(40, 2).tolist()
    mine = lm.generate(ids, quant="my_int8", max_new_tokens=6)
    ref = lm.generate(ids, quant="int8", max_new_tokens=6)
    assert mine.ids == ref.ids and mine.cache_bytes == ref.cache_bytes


def test_compose_generates_like_method_plus_quant():
    lm = tiny_lm(seed=0, head_dim=32)  # kivi's groups of 32 channels
    ids = random_ids(200, 3).tolist()
    composed = lm.generate(ids, method="compose(snapkv(window=4), kivi-2)", ratio=0.5, max_new_tokens=8)
    apart = lm.generate(ids, method="snapkv(window=4)", ratio=0.5, quant="kivi-2", max_new_tokens=8)
    assert composed.ids == apart.ids and composed.cache_bytes == apart.cache_bytes
    with pytest.raises(ValueError, match="already quantizes"):
        lm.generate(ids, method="compose(snapkv(window=4), kivi-2)", ratio=0.5, quant="int8")


# ------------------------------------------------------------------------------------- bad plugins
def test_bad_plugins_api(tmp_path):
    with pytest.raises(ValueError, match="plugin .*nope.py: no such file"):
        kvjax.plugins.load_plugin(tmp_path / "nope.py")
    with pytest.raises(ValueError, match="plugin no_such_module_kvjax: no module named 'no_such_module_kvjax'"):
        kvjax.plugins.load_plugin("no_such_module_kvjax")
    with pytest.raises(ValueError, match="expected a .py file or a module name"):
        kvjax.plugins.load_plugin("not a module")
    # a plugin that registers, then raises: reported with the file and exception; nothing stays registered
    path = write(tmp_path, "half_done", RECENT.replace("{name}", "half_done").replace("{cls}", "Half")
                 + "\nraise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ValueError) as e:
        kvjax.plugins.load_plugin(path)
    assert str(e.value) == f"plugin {path} raised RuntimeError on import: boom second line"
    assert "half_done" not in methods.registry() and "kvjax_plugin_half_done" not in sys.modules
    path.write_text(RECENT.replace("{name}", "half_done").replace("{cls}", "Half"))  # fixed: loads now
    kvjax.plugins.load_plugin(path)
    assert "half_done" in methods.registry()
    # a plugin importing something missing is not "no module named <plugin>"
    broken = write(tmp_path, "needs_dep", "import no_such_dependency_kvjax\n")
    with pytest.raises(ValueError, match="raised ModuleNotFoundError on import: No module named"):
        kvjax.plugins.load_plugin(broken)
    # a file named like a real module does not shadow it; another file of a loaded plugin's name is refused
    shadow = kvjax.plugins.load_plugin(write(tmp_path, "json", "x = 1\n"))
    assert shadow.x == 1 and sys.modules["json"] is not shadow and hasattr(sys.modules["json"], "dumps")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="another plugin file of that name is loaded .*json.py.*; rename the file"):
        kvjax.plugins.load_plugin(write(tmp_path / "other", "json", "x = 2\n"))


@pytest.mark.parametrize("case", ["missing", "raises", "syntax", "twice", "builtin_name", "module", "compose_order",
                                  "compose_unknown", "compose_two_quant"])
def test_bad_input_on_the_cli_is_one_line_and_exit_2(case, lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kvjax, "load", lambda *a, **k: lm)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ppl = ["eval", "ppl", "--text", text, "--context-len", 32, "--eval-len", 8, "--n", 1, "--no-plots",
           "--out", tmp_path / "ppl.csv"]
    first = recent_plugin(tmp_path, stem="first", name="twin", cls="First")
    argv, fragments = {
        "missing": (ppl + ["--import", tmp_path / "nope.py", "--method", "x", "--ratio", 0.5], ["nope.py: no such file"]),
        "raises": (ppl + ["--import", write(tmp_path, "boom", "raise KeyError('bad key')\n"), "--method", "x",
                          "--ratio", 0.5], ["boom.py raised KeyError on import: 'bad key'"]),
        "syntax": (["methods", "--import", write(tmp_path, "typo", "def f(:\n")],
                   ["typo.py raised SyntaxError on import"]),
        "twice": (["methods", "--import", first, "--import", recent_plugin(tmp_path, "second", "twin", "Second")],
                  ["second.py raised ValueError on import",
                   "name 'twin' registered twice: kvjax_plugin_first.First and kvjax_plugin_second.Second"]),
        "builtin_name": (["generate", "--prompt", "hi", "--import",
                          recent_plugin(tmp_path, "shadow", "snapkv", "Shadow")],
                         ["registered twice: kvjax.methods.snapkv.SnapKV and kvjax_plugin_shadow.Shadow"]),
        "module": (["inspect", "--input-ids", tmp_path / "ids.npy", "--out", tmp_path / "o.npz", "--method", "snapkv",
                    "--ratio", 0.5, "--import", "no_such_module_kvjax"], ["no module named 'no_such_module_kvjax'"]),
        "compose_order": (ppl + ["--method", "compose(kivi-2, snapkv)", "--ratio", 0.5],
                          ["the quantizer kivi-2 comes before the method snapkv"]),
        "compose_unknown": (ppl + ["--import", first, "--method", "compose(twin, nope)", "--ratio", 0.5],
                            ["compose(twin, nope): unknown method 'nope'", "twin"]),
        "compose_two_quant": (ppl + ["--method", "compose(snapkv, kivi-2, int8)", "--ratio", 0.5],
                              ["two quantizers (kivi-2, int8)"]),
    }[case]
    rc, _, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, *fragments)
