"""Training of learned compressors (optax, orbax, grain) on a frozen model.

    from kvjax.train import MatryoshkaTask, TrainConfig, load_tokens, token_batches, train

Modules: `loop` (train step, optimizer, checkpoints, data-parallel mesh), `data` (token windows),
`matryoshka` (MatryoshkaKV), `duo` (DuoAttention's gates), `command` (`kvjax train`). Names are imported on first use, so the CLI
does not load optax / grain unless it trains. Core never imports this package: what inference needs
of a trained run (`load_trained`, `model_id`, MatryoshkaKV's bases) is `kvjax.checkpoints`.
"""
import importlib

_EXPORTS = {
    "TrainConfig": "loop", "TrainState": "loop", "TrainResult": "loop", "train": "loop", "train_step": "loop",
    "make_mesh": "loop", "make_optimizer": "loop", "lr_schedule": "loop",
    "load_tokens": "data", "token_batches": "data",
    "MatryoshkaTask": "matryoshka", "cayley": "matryoshka", "pca_basis": "matryoshka",
    "DuoTask": "duo", "PasskeyBatches": "duo",
    "CLATask": "cla",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kvjax.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kvjax.train' has no attribute {name!r}")
