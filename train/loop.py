"""The training loop of kvjax's learned compressors: frozen backbone, small trainable compressor.

    result = train(task, backbone_params, token_batches(tokens, 128, 8, seed=0), TrainConfig(steps=500),
                   out_dir="runs/matryoshka")

* A **task** (e.g. `MatryoshkaTask`) is a frozen, hashable dataclass with
  `init(backbone, calib_tokens) -> (params, const)`, `loss(params, const, backbone, tokens, key)
  -> (loss, metrics)` and `meta() -> dict` (what a checkpoint must match: method and model), and
  optionally `project(params) -> params`, applied after every update (projected gradient descent).
  `params` is the trainable pytree, `const` what the task computed once and keeps fixed (PCA bases).
  The backbone's params are an argument of the step, never differentiated or updated.
* **Step** (`train_step`): pure, jitted once with the `TrainState` donated. Its PRNG key is
  `fold_in(key(seed), step)` and its batch is `batches[step]`, so the run is a function of (seed, step)
  and a resumed run repeats an uninterrupted one exactly.
* **Optimizer**: optax AdamW, linear warmup then cosine decay to 10% of the peak, global-norm clipping
  (Loshchilov & Hutter 2019; the flax lm1b example's schedule shape).
* **Data parallel**: a 1-D `jax.sharding.Mesh` with axis "data"; batches are split along it, state and
  backbone replicated; gradients are averaged by XLA (the loss is a mean over the global batch).
  Across processes (`kvjax.distributed`: `kvjax train ... --coordinator ...`) the mesh spans every
  process's devices; each process builds the same batches and places its own shards of them; every
  process takes part in orbax's checkpoint writes and reads (a file system they share), and process 0
  alone writes `settings.json`, `metrics.jsonl` and the progress bar.
* **Checkpoints**: an orbax `CheckpointManager` under `out_dir/checkpoints`, every `save_every` steps
  and at the end, keeping the last `keep`; each holds the state and a JSON `meta`. Resuming restores
  the newest readable checkpoint: an unreadable one (corrupted files) is skipped with a one-line
  warning, and a folder with checkpoints but none readable is a ValueError (never a fresh start over
  them); a checkpoint of another method or model, or whose arrays have other shapes than this run's,
  is a ValueError. Reading a run for inference (`load_trained`, `model_id`, the meta check) is core:
  `kvjax.checkpoints`.
* **Settings** (`out_dir/settings.json`): what the run is, written when it starts: the task's method
  and model (name and config hash) and its fields (`hidden`, `response`, `n_levels`, loss weights,
  ...), every `TrainConfig` field, and the caller's `settings=` (`kvjax train`: the data's token digest
  and source, the dtype). `resume` checks them *before anything on disk changes*: a run may continue
  with another `steps` (to train longer; the cosine schedule then stretches to the new end), `save_every`,
  `keep`, `log_every` or data source path (`MAY_CHANGE`), and any other difference (model, method,
  architecture sizes, `seq_len`, `batch_size`, optimizer settings, seed, data tokens) is a ValueError
  naming each setting, old -> new: continuing would mix two runs' checkpoints and metrics in one folder.
  A folder with checkpoints but no settings.json (a run from before they were saved) is not resumed.
* **Metrics**: loss, grad norm (before clipping), learning rate, the task's own metrics and tokens/s,
  every `log_every` steps, to `out_dir/metrics.jsonl` (one JSON object per line) and to stdout with a
  tqdm progress bar. A resumed run first drops the log's records past the restored step.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

# checkpoints as inference reads them live in core; `load_trained` and `model_id` stay importable from here
from kvjax.checkpoints import (CheckpointMismatch, check_meta, load_trained, model_id,  # noqa: F401
                               quiet_absl, same_model)

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run-level knobs. `warmup` steps of linear warmup to `lr`, then cosine decay to lr/10 at `steps`."""

    steps: int
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "save_every", "keep", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        for name in ("lr", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Attributes: step int32 []; params the trainable pytree; const the task's fixed arrays;
    opt_state the optax state of `params`."""

    step: jax.Array
    params: dict
    const: dict
    opt_state: tuple


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    log: list[dict]  # the records written to metrics.jsonl by this run


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = min(cfg.warmup, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(init_value=cfg.lr / (warmup + 1), peak_value=cfg.lr,
                                              warmup_steps=warmup, decay_steps=cfg.steps, end_value=cfg.lr / 10)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay))


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over the first `n_devices` devices (default: all)."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"mesh size {n} outside [1, {len(devices)}] (the devices JAX sees)")
    return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def check_mesh(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not a multiple of the mesh's data axis ({n} devices)")


def init_state(task, backbone, calib_tokens, cfg: TrainConfig) -> TrainState:
    params, const = task.init(backbone, jnp.asarray(calib_tokens))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, const=const,
                      opt_state=make_optimizer(cfg).init(params))


def train_step(state: TrainState, backbone, tokens, *, task, cfg: TrainConfig):
    """One AdamW step on tokens int32 [B, L + 1] -> (new state, metrics {name: float32 []})."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, state.const, backbone, tokens,
                                                                     key)
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if hasattr(task, "project"):  # a constrained task maps its params back to their set (DuoAttention: [0, 1])
        params = task.project(params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(cfg)(state.step), **aux}
    return TrainState(step=state.step + 1, params=params, const=state.const, opt_state=opt_state), metrics


@functools.lru_cache(maxsize=8)
def jit_train_step(task, cfg: TrainConfig):
    """`train_step` jitted once for (task, cfg), the state donated (cached: a resumed or repeated run in
    the same process reuses the compiled step)."""
    return jax.jit(functools.partial(train_step, task=task, cfg=cfg), donate_argnums=0)


def replicate(mesh: Mesh, tree):
    """Every array of `tree` replicated over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(mesh: Mesh, tokens):
    """tokens [B, ...] split along the mesh's data axis."""
    return jax.device_put(tokens, NamedSharding(mesh, P(DATA_AXIS)))


def train(task, backbone, batches, cfg: TrainConfig, out_dir, *, resume: bool = False, mesh: Mesh | None = None,
          on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
          settings: dict | None = None) -> TrainResult:
    """Train `task`'s compressor for `cfg.steps` steps on `batches` (batches[s]: int32 [B, L + 1]).

    `resume`: continue from the newest readable checkpoint in `out_dir` (a fresh start if there is
    none), after checking that the run's saved settings match this one's (`check_settings`);
    without it, an `out_dir` that already holds checkpoints is a ValueError. `settings`: what else
    defines the run (JSON values; e.g. the data's digest), saved and checked with the rest.
    `on_step(step, metrics)` is called after every step (evaluation, early stopping). Returns the
    final state and the metric records written.
    """
    mesh = mesh or make_mesh()
    check_mesh(mesh, cfg.batch_size)
    first = np.asarray(batches[0])
    if first.shape != (cfg.batch_size, cfg.seq_len + 1):
        raise ValueError(f"batches hold {first.shape}, expected [batch_size, seq_len + 1] = "
                         f"{(cfg.batch_size, cfg.seq_len + 1)}")
    out_dir = Path(out_dir)
    settings = run_settings(task, cfg, settings)
    if resume:
        check_settings(out_dir, settings)  # before anything in out_dir changes
    mngr = checkpoint_manager(out_dir, cfg)
    if mngr.all_steps() and not resume:
        raise ValueError(f"{out_dir} already holds checkpoints (steps {mngr.all_steps()}): resume, or pick a new "
                         "output directory")
    meta = dict(task.meta(), config=dataclasses.asdict(cfg))
    state = init_state(task, backbone, first, cfg)
    state, backbone = replicate(mesh, (state, backbone))
    if resume:
        state = restore(mngr, state, meta)
    start = int(state.step)
    if start > cfg.steps:
        raise ValueError(f"the checkpoint is at step {start}, past the requested {cfg.steps} steps")
    leader = jax.process_index() == 0
    if leader:
        _write_json(out_dir / SETTINGS_FILE, settings)
    log = _open_log(out_dir / "metrics.jsonl", start) if leader else open(os.devnull, "w")
    step_fn = jit_train_step(task, cfg)
    records = []
    bar = tqdm(total=cfg.steps, initial=start, file=sys.stdout, disable=not (progress and leader), desc=task.name)
    t_last, steps_since = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            state, metrics = step_fn(state, backbone, shard_batch(mesh, np.asarray(batches[step])))
            done, steps_since = step + 1, steps_since + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                record = {"step": done, **values,
                          "tokens_per_s": steps_since * cfg.batch_size * cfg.seq_len / (now - t_last)}
                t_last, steps_since = now, 0
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
            if done % cfg.save_every == 0:
                mngr.save(done, args=_save_args(state, meta))
            if on_step is not None:
                on_step(done, metrics)
            bar.update(1)
        if mngr.latest_step() != cfg.steps:
            mngr.save(cfg.steps, args=_save_args(state, meta), force=True)
    finally:
        bar.close()
        log.close()
        mngr.wait_until_finished()
        mngr.close()
    return TrainResult(state=state, log=records)


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_manager(out_dir: Path, cfg: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=cfg.save_every, max_to_keep=cfg.keep, create=True)
    return ocp.CheckpointManager(Path(out_dir).absolute() / "checkpoints", options=options)


def _save_args(state: TrainState, meta: dict):
    return ocp.args.Composite(state=ocp.args.StandardSave(dataclasses.asdict(state)), meta=ocp.args.JsonSave(meta))


def restore(mngr: ocp.CheckpointManager, target: TrainState, meta: dict) -> TrainState:
    """The newest readable checkpoint restored into `target`'s structure and shardings (`target` itself
    if there is none). Unreadable checkpoints are skipped with a one-line warning; ValueError if every
    one is unreadable, or if one's method or model differs from `meta`, or its params / const have
    other shapes than `target`'s."""
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      dataclasses.asdict(target))
    steps = sorted(mngr.all_steps(), reverse=True)
    _drop_closed_loop_errors()
    for step in steps:
        try:
            with quiet_absl():
                saved_meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                check_meta(saved_meta, meta)
                _check_shapes(mngr.directory / str(step) / "state", abstract, step)
                restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged checkpoint
            _quiet_failed_reads(mngr.directory / str(step))
            warnings.warn(f"checkpoint at step {step} is unreadable ({_first_line(e)}); trying an older one")
            continue
        return TrainState(**restored["state"])
    if steps:
        raise ValueError(f"no checkpoint in {mngr.directory} is readable (steps {sorted(steps)}): it is not "
                         "trained over from step 0; pick a new output directory")
    return target


def _check_shapes(state_dir: Path, abstract: dict, step: int) -> None:
    """CheckpointMismatch if the saved params / const (orbax's metadata, nothing read) have other shapes
    than `abstract`'s: restoring them would fail deep inside orbax."""
    saved = ocp.StandardCheckpointHandler().metadata(Path(state_dir)).tree
    for part in ("params", "const"):
        want = dict(jax.tree_util.tree_flatten_with_path(abstract[part])[0])
        have = dict(jax.tree_util.tree_flatten_with_path(saved.get(part, {}))[0])
        for path in sorted(set(want) | set(have), key=jax.tree_util.keystr):
            old = tuple(have[path].shape) if path in have else None
            new = tuple(want[path].shape) if path in want else None
            if old != new:
                raise CheckpointMismatch(f"checkpoint mismatch: the checkpoint at step {step} holds {part}"
                                         f"{jax.tree_util.keystr(path)} of shape {old}, this run's is {new}: it "
                                         "was trained with other settings; pick a new output directory")


_DAMAGED: set[str] = set()  # checkpoint folders found unreadable in this process


def _quiet_failed_reads(step_dir) -> None:
    """Keep the leftovers of a failed orbax read of `step_dir` off the terminal, for the rest of the process.

    orbax reads under a fresh event loop that it closes when the first array read fails; tensorstore's
    other reads still finish on their threads and call back into the closed loop (an unraisable
    "RuntimeError: Event loop is closed" traceback each), and their failed tasks log "Task exception was
    never retrieved" when collected. The damage is already reported in one line: drop exactly those
    (other unraisable exceptions go to the previous hook; asyncio records about other files stay).
    The hook is in place before the first read (`_drop_closed_loop_errors`): a late callback may fire
    before the read's failure reaches `restore`."""
    _DAMAGED.add(str(step_dir))


_HOOKED: list[bool] = [False]


def _drop_closed_loop_errors() -> None:
    """Install, once per process, the unraisable hook and the asyncio filter of `_quiet_failed_reads`."""
    if _HOOKED[0]:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_not_about_damaged)
    _HOOKED[0] = True


def _closed_loop(exc: BaseException | None) -> bool:
    """`exc`, or an exception it was raised from, is asyncio's "Event loop is closed" (tensorstore wraps
    it in its own exception when its callback fails)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _not_about_damaged(record: logging.LogRecord) -> bool:
    """False for a log record whose exception names a damaged checkpoint folder."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and any(d in str(exc) for d in _DAMAGED))


def _first_line(e: BaseException, width: int = 160) -> str:
    """`Type: message` of an exception, cut to its first line and `width` characters (orbax's messages
    carry whole TensorStore specs)."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= width else text[:width - 1] + "…"


# --------------------------------------------------------------------------------------- settings
SETTINGS_FILE = "settings.json"
# what a resumed run may change: its length and bookkeeping, and where the (same) data is read from
MAY_CHANGE = frozenset({"steps", "save_every", "keep", "log_every", "data_source"})


def run_settings(task, cfg: TrainConfig, extra: dict | None = None) -> dict:
    """The settings that define a run, as JSON values: the task's `meta()` (method, model) and its
    dataclass fields (a field named like a `TrainConfig` one is `task.<name>`), `cfg`'s fields, `extra`."""
    settings = dict(task.meta())
    config = dataclasses.asdict(cfg)
    for f in dataclasses.fields(task):
        if f.name not in ("cfg", "model_name"):  # both are in `model` (name and config hash)
            settings.setdefault(f"task.{f.name}" if f.name in config else f.name, getattr(task, f.name))
    settings.update(config)
    settings.update(extra or {})
    return json.loads(json.dumps(settings, default=str))


def check_settings(out_dir, settings: dict) -> None:
    """ValueError unless `out_dir` can be resumed with `settings`: its saved settings differ only in
    `MAY_CHANGE` (the model compared by its config hash), or it holds no run yet. Reads only."""
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        ckpts = out_dir / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            raise ValueError(f"{out_dir} holds checkpoints but no {SETTINGS_FILE} (a run from a kvjax that did not "
                             "save its settings): it cannot be checked against this run's settings, so it is not "
                             "resumed; pick a new output directory")
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}): cannot check the run's settings") from None
    differ = []
    for key in [*saved, *(k for k in settings if k not in saved)]:
        old, new = saved.get(key), settings.get(key)
        same = same_model(old, new) if key == "model" else old == new
        if key not in MAY_CHANGE and not same:
            differ.append(f"{key} {_show(old)} → {_show(new)}")
    if differ:
        raise ValueError(f"{out_dir} was trained with other settings ({', '.join(differ)}; saved in {path}): "
                         "resume with the run's settings, or pick a new output directory")


def data_digest(tokens) -> str:
    """`N tokens, blake2b HEX` of a token array: what `settings["data"]` records of a run's data."""
    a = np.ascontiguousarray(np.asarray(tokens, np.int32))
    return f"{a.size} tokens, blake2b {hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest()}"


def _show(value) -> str:
    return "(unset)" if value is None else json.dumps(value) if isinstance(value, (str, list, dict)) else str(value)


def _write_json(path: Path, value: dict) -> None:
    """`value` as JSON at `path`, atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _open_log(path: Path, start: int):
    """metrics.jsonl opened for appending, keeping only records at or before step `start`."""
    kept = []
    if start > 0 and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and json.loads(line)["step"] <= start:
                kept.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(kept))
    return path.open("a")
