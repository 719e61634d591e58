"""Healing a CLA conversion (`kvjax.methods.crosslayer.CLA`) by short distillation.

Converting a trained model to Cross-Layer Attention (Brandon et al. 2024, arXiv 2405.12981) makes each
consumer layer attend to its producer's K/V, which its query and output projections were not trained for.
Healing trains exactly those: the q_proj and o_proj of every consumer layer (the producers and everything
else stay frozen), with the unconverted model as the teacher, by logit distillation: the mean over
positions of KL(teacher || student) on next-token distributions (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network", the T = 1 case; the loss MatryoshkaKV's training uses here too). The CE of
the student on the data is logged as a metric, not trained on: the teacher's distribution is the target.

    kvjax train cla --model smollm2-135m --steps 100 --out runs/cla [--spec "cla(group=2, layers=deep)"]
    kvjax generate --model runs/cla --method cla ...   # the healed model: its consumers' q/o from the run

Legend: B batch, T tokens, E d_model, H query heads, D head dim, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from kvjax import methods, pipeline
from kvjax.checkpoints import model_id
from kvjax.methods.crosslayer import CLA, HEALED, merge_healed
from kvjax.models.config import LlamaConfig
from kvjax.states.cache import model_cache, route_share
from kvjax.train.matryoshka import cross_entropy, kl_divergence


@dataclasses.dataclass(frozen=True)
class CLATask:
    """Healing of one CLA conversion as a training task (`kvjax.train.loop`).

    Attributes:
      cfg: the backbone's config.  model_name: recorded in checkpoints (with a hash of `cfg`).
      spec: the CLA conversion, a `cla(...)` spec (default: adjacent pairs in the deep half).
    """

    cfg: LlamaConfig
    model_name: str
    spec: str = "cla"
    name: ClassVar[str] = "cla"

    def __post_init__(self):
        method = methods.get(self.spec)
        if not isinstance(method, CLA) or method.press is not None:
            raise ValueError(f"kvjax train cla heals a cla(...) conversion without press=, got {self.spec!r}")
        object.__setattr__(self, "spec", methods.spec_of(method))
        if not self.consumers():
            raise ValueError(f"{self.spec}: no layer reads another's K/V, nothing to heal")

    def route(self) -> tuple[int, ...]:
        return methods.get(self.spec).route(self.cfg)

    def consumers(self) -> list[int]:
        return [i for i, r in enumerate(self.route()) if r != i]

    def meta(self) -> dict:
        return {"method": self.name, "model": model_id(self.model_name, self.cfg), "spec": self.spec}

    def init(self, backbone, calib_tokens) -> tuple[dict, dict]:
        """(params: the consumer layers' q_proj and o_proj, as in `backbone`; const: nothing)."""
        params = {f"layers_{i}": {name: backbone[f"layers_{i}"]["attn"][name] for name in HEALED}
                  for i in self.consumers()}
        return jax.tree_util.tree_map(lambda x: x.copy(), params), {}

    def student_logits(self, params, backbone, x):
        """Logits [B, T, V] of the converted model (consumers attend to their producer's K/V) with the trained
        projections, on tokens x int32 [B, T]."""
        b, t = x.shape
        cache = model_cache(self.cfg, b, t, share=route_share(self.route()))
        return pipeline.forward(merge_healed(backbone, params), self.cfg, x, cache)[0]

    def loss(self, params, const, backbone, tokens, key):
        """KL(teacher || student) on tokens int32 [B, T + 1] (the first T are fed); `key` unused (no sampling)."""
        x, y = tokens[:, :-1], tokens[:, 1:]
        teacher = jax.lax.stop_gradient(pipeline.forward(backbone, self.cfg, x)[0])
        student = self.student_logits(params, backbone, x)
        kl = kl_divergence(teacher, student)
        return kl, {"kl": kl, "ce": cross_entropy(student, y)}
