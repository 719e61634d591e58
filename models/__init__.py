"""Functional Flax transformers for kvjax, one module per model family, picked by `model_for(cfg)`.

    model = model_for(cfg)(cfg)                    # the family's Flax module for a config
    logits, cache = model.apply({"params": params}, tokens, positions, cache)

A family registers its config class and module (`register_family`); everything that builds a
model goes through `model_for`, so a new family is an addition, not an edit of the callers.
"""
from kvjax.models.config import LlamaConfig
from kvjax.models.llama import Llama
from kvjax.models.rope import apply_rope, rope_inv_freq

_FAMILIES: dict[type, type] = {}


def register_family(config_cls: type, module_cls: type) -> None:
    """Make `model_for` build `module_cls` for configs of class `config_cls`."""
    if config_cls in _FAMILIES:
        raise ValueError(f"a model family for {config_cls.__name__} is registered twice")
    _FAMILIES[config_cls] = module_cls


def model_for(cfg) -> type:
    """The Flax module class of a config's family."""
    try:
        return _FAMILIES[type(cfg)]
    except KeyError:
        raise ValueError(f"no model family registered for {type(cfg).__name__}; known: "
                         f"{', '.join(c.__name__ for c in _FAMILIES)}") from None


register_family(LlamaConfig, Llama)

__all__ = ["LlamaConfig", "Llama", "model_for", "register_family", "apply_rope", "rope_inv_freq"]
