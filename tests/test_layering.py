"""Layering of the packages: every module imports alone, core never reaches training, no hidden imports.

The layers, bottom up: `kvjax.kernels` (pallas_kernels/), `kvjax.models` (models/) and the core
(kvjax/) are inference; `kvjax.train` (train/) trains learned compressors on top of them. Core reads
trained artifacts through `kvjax.checkpoints`, never through `kvjax.train`. Not even the CLI imports it:
`kvjax train` is added through the entry-point group `kvjax.commands` (setup.cfg, `kvjax.cli.added_commands`).

Imports live at the top of a module. An import inside a function hides a dependency (often a cycle
that the module graph should not have) and defers its failure to the first call; the few allowed
ones are listed below with their reason.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvjax": "kvjax", "models": "kvjax.models", "pallas_kernels": "kvjax.kernels", "train": "kvjax.train"}
CORE = ("kvjax", "models", "pallas_kernels")  # folders that must not import kvjax.train, nor import inside functions

# (file, imported module) -> why it is imported inside a function. Optional heavy dependencies only.
LAZY_IMPORTS = {
    ("kvjax/eval/plots.py", "matplotlib"): "drawing only: matplotlib takes ~0.7 s to import, and selecting the Agg "
                                           "backend on `import kvjax.eval.plots` would switch a notebook's backend",
    ("kvjax/eval/plots.py", "matplotlib.pyplot"): "imported after `matplotlib.use('Agg')` (see above)",
    ("kvjax/data.py", "tensorflow_datasets"): "optional (tfds/test extras): imported only for tfds:NAME or when a "
                                              "prepared TFDS dataset's folder exists; ~0.7 s to import",
}


def _sources(folders=tuple(PACKAGES)) -> list[tuple[Path, str]]:
    """(file, module name) of every Python file in the folders, e.g. (models/rope.py, kvjax.models.rope)."""
    out = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((path, ".".join([PACKAGES[folder], *parts])))
    return out


def _imports(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], ast.AST]]:
    """(module, names, node) of every import under `node`, with `module` the absolute name imported and
    `names` every module name the statement may bind (`from a import b`: `a` and `a.b`). Statements, and
    `__import__` / `importlib.import_module` called with a literal name (dynamic names, e.g. user
    plugins, are not imports of a fixed module)."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out += [(alias.name, [alias.name], n) for alias in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (n.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [base] + [f"{base}.{alias.name}" for alias in n.names if alias.name != "*"], n))
        elif isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) \
                and isinstance(n.args[0].value, str):
            f = n.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in ("__import__", "import_module"):
                out.append((n.args[0].value, [n.args[0].value], n))
    return out


def _function_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(module, line) of the imports inside function bodies (methods and nested functions included)."""
    seen, out = set(), []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for name, _, node in _imports(fn, module, is_package):
                if (name, id(node)) not in seen:
                    seen.add((name, id(node)))
                    out.append((name, node.lineno))
    return sorted(out, key=lambda x: x[1])


def _parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


# ----------------------------------------------------------------------------------- static checks
def test_core_never_imports_train():
    bad = []
    for path, module in _sources(CORE):
        rel = path.relative_to(ROOT).as_posix()
        for _, names, node in _imports(_parse(path), module, path.name == "__init__.py"):
            for name in names:
                if name == "kvjax.train" or name.startswith("kvjax.train."):
                    bad.append(f"{rel}:{node.lineno} imports {name}")
    assert not bad, ("core imports the training package (read trained artifacts through kvjax.checkpoints):\n"
                     + "\n".join(bad))


def test_the_train_command_is_added_through_its_entry_point():
    """`kvjax train` reaches the CLI through the `kvjax.commands` entry points, not an import of core."""
    from kvjax.cli import added_commands

    commands = added_commands()
    assert "train" in commands and commands["train"].__name__ == "kvjax.train.command"


def test_no_imports_inside_functions():
    bad, used = [], set()
    for path, module in _sources(CORE):
        rel = path.relative_to(ROOT).as_posix()
        for name, line in _function_imports(_parse(path), module, path.name == "__init__.py"):
            if (rel, name) in LAZY_IMPORTS:
                used.add((rel, name))
            else:
                bad.append(f"{rel}:{line} imports {name} inside a function")
    assert not bad, ("imports inside functions (move them to the top of the module; a cycle means the module "
                     "graph needs a fix, e.g. a lower-level module; only heavy optional dependencies may be "
                     "imported lazily, listed with a reason in LAZY_IMPORTS):\n" + "\n".join(bad))
    stale = set(LAZY_IMPORTS) - used
    assert not stale, f"LAZY_IMPORTS entries that match nothing any more, delete them: {sorted(stale)}"


def test_static_checks_see_what_they_should():
    """The checker itself: relative imports resolve, function-level and disguised imports are found."""
    src = ("import os\nfrom . import base\nfrom ..train import loop\n"
           "def f():\n    import numpy as np\n    from kvjax.train.loop import model_id\n"
           "    return __import__('jax'), __import__(name)\n"
           "class C:\n    def m(self):\n        import importlib\n        importlib.import_module('kvjax.train')\n")
    tree = ast.parse(src)
    names = {n for _, ns, _ in _imports(tree, "kvjax.methods.locret", False) for n in ns}
    assert names == {"os", "kvjax.methods", "kvjax.methods.base", "kvjax.train", "kvjax.train.loop", "numpy",
                     "kvjax.train.loop.model_id", "jax", "importlib"}
    inner = _function_imports(tree, "kvjax.methods.locret", False)
    assert inner == [("numpy", 5), ("kvjax.train.loop", 6), ("jax", 7), ("importlib", 10), ("kvjax.train", 11)]
    assert _imports(ast.parse("from .. import train"), "kvjax.methods", True)[0][1] == ["kvjax", "kvjax.train"]


# ------------------------------------------------------------------------------ fresh interpreters
def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """`python -c "import M"` succeeds for every module M of kvjax/, models/, pallas_kernels/ and train/.

    Importing any `kvjax.*` module first runs `kvjax/__init__.py` to completion, so for the modules
    that `import kvjax` itself loads, a fresh `import M` executes exactly the import sequence of a
    fresh `import kvjax`: one interpreter checks them all. Every other module (the eval harness, the
    training package, the CLI, kernel lowering, ...) gets its own interpreter, two at a time.
    KVJAX_LAYERING_ALL=1 gives every module its own interpreter (slow: ~4 s each on 2 cores)."""
    modules = [m for _, m in _sources()]
    probe = _run("import json, sys, kvjax; print(json.dumps(sorted(m for m in sys.modules if m.startswith('kvjax'))))")
    assert probe.returncode == 0, f"`import kvjax` fails in a fresh interpreter:\n{probe.stderr[-4000:]}"
    loaded = set(json.loads(probe.stdout.strip().splitlines()[-1]))
    alone = modules if os.environ.get("KVJAX_LAYERING_ALL") else [m for m in modules if m not in loaded]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda m: (m, _run(f"import {m}")), alone))
    failed = [f"{m}:\n{r.stderr.strip()[-2000:]}" for m, r in results if r.returncode != 0]
    assert not failed, "modules that do not import alone in a fresh interpreter:\n\n" + "\n\n".join(failed)
    assert len(loaded & set(modules)) + len(alone) >= len(modules)


@pytest.mark.parametrize("module", ["kvjax.models", "kvjax.checkpoints"])
def test_inference_modules_do_not_load_train(module):
    """Loading core (here the model registry and the trained-artifact reader) loads no `kvjax.train` module."""
    r = _run(f"import json, sys, {module}; print(json.dumps([m for m in sys.modules if m.startswith('kvjax.train')]))")
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
