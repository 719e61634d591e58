"""User plugins: a researcher's own methods and quantizers, imported before method names are resolved.

    kvjax eval ppl --import my_press.py --method my_press --ratio 0.5     # CLI (--import repeats)
    kvjax.plugins.load_plugin("my_press.py")                              # API (or just `import`)

A plugin registers its classes when imported (`@kvjax.register_method("my_press")`,
`@kvjax.register_quantizer(...)`). `spec`: a path ending in `.py`, loaded with importlib as the
module `kvjax_plugin_<file stem>` (registered in `sys.modules`; the prefix keeps a file named like a
real package, optax.py say, from standing in for it), or a module name to import.

Loading the same file again returns the module already loaded (the file runs once per process); a
different file of a loaded plugin's name is an error (rename it). Every failure is a
one-line ValueError naming the plugin: no such file or module, or the exception it raised on import
(whatever it registered before raising is unregistered again).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

from kvjax.methods import base

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


PREFIX = "kvjax_plugin_"  # module names of plugin files: PREFIX + the file stem


def load_plugins(specs: Iterable[str | os.PathLike]) -> list[ModuleType]:
    """`load_plugin` of each spec, in order."""
    return [load_plugin(s) for s in specs]


def load_plugin(spec: str | os.PathLike) -> ModuleType:
    """Import a plugin: a `.py` file (module name: `PREFIX` + its stem) or a module name. Returns the module."""
    text = os.fspath(spec)
    if text.endswith(".py") or isinstance(spec, os.PathLike):
        return _load_file(text)
    if not _MODULE.fullmatch(text):
        raise ValueError(f"plugin {text!r}: expected a .py file or a module name")
    return _guarded(text, lambda: importlib.import_module(text), module=text)


def _load_file(text: str) -> ModuleType:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"plugin {text}: no such file" if not path.exists() else f"plugin {text}: not a file")
    path = path.resolve()
    # a private module name: a plugin file called optax.py must not stand in for the real optax
    name = PREFIX + re.sub(r"\W", "_", path.stem)
    held = sys.modules.get(name)
    if held is not None:
        where = getattr(held, "__file__", None)
        if where is not None and Path(where).resolve() == path:
            return held  # loaded already: the file runs once
        raise ValueError(f"plugin {text}: another plugin file of that name is loaded ({where}); rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"plugin {text}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)

    def run():
        sys.modules[name] = module  # before running it: dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module

    return _guarded(text, run)


def _guarded(text: str, run, module: str | None = None) -> ModuleType:
    """run() with every exception made one ValueError line, and the registry restored on failure."""
    before = dict(base._REGISTRY)
    try:
        return run()
    except Exception as e:  # noqa: BLE001 (any failure of user code on import: one line naming the plugin)
        base._REGISTRY.clear()
        base._REGISTRY.update(before)
        if module is not None and isinstance(e, ModuleNotFoundError) and e.name \
                and (e.name == module or module.startswith(e.name + ".")):
            raise ValueError(f"plugin {text}: no module named {module!r} (give a .py file or an importable "
                             "module name)") from None
        message = " ".join(str(e).split()) or "(no message)"
        raise ValueError(f"plugin {text} raised {type(e).__name__} on import: {message}") from None
