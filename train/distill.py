"""Healing a converted model by distillation from the unconverted one (X-EcoMLA, Li et al. 2025,
arXiv 2503.11132, Sec. 3.2: KL of the student's next-token distribution from the teacher's).

A converted model (`kvjax convert palu`, `kvjax convert mla`) attends over low-rank latents its projections
were not trained for. Healing trains the attention projections of every layer (Palu: q/k/v/o, with the
student's cache method in the forward pass, its bases fixed so the cache keeps its bytes; MLA: q_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj, over its own MLA cache), everything else frozen; the teacher is the unconverted model (by default
the student's base; another model must share the student's vocabulary). The loss is the mean over
positions of KL(teacher || student) (Hinton et al. 2015, T = 1); the student's CE on the data is logged.

    kvjax convert palu --model smollm2-135m --rank 16 --out runs/palu16
    kvjax train distill --student runs/palu16 --steps 100 --out runs/palu16-healed [--resume]
    kvjax eval ppl --model runs/palu16-healed          # the healed model with its Palu cache
    kvjax convert mla --model smollm2-135m --kv-rank 128 --out runs/mla128
    kvjax train distill --student runs/mla128 --steps 100 --out runs/mla128-healed
    kvjax train distill --student runs/clla --fake-quant per_token-4 --steps 100 --out runs/clla-int4

`kvjax.load(OUT)` opens the result: the student directory's model with the newest checkpoint's
projections (`load_healed`).

Legend: B batch, T tokens, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from kvjax import pipeline, quantizers
from kvjax.checkpoints import model_id
from kvjax.methods.crosslayer import merge_healed
from kvjax.methods.palu import Palu
from kvjax.models.config import LlamaConfig
from kvjax.states.mla import mla_cache
from kvjax.train.matryoshka import cross_entropy, kl_divergence

# the attention projections X-EcoMLA heals: a Llama-family student's, an MLA student's
TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


@dataclasses.dataclass(frozen=True)
class DistillTask:
    """Distillation of a converted student from a teacher as a training task (`kvjax.train.loop`).

    Attributes:
      cfg: the student's (= its base model's) config.  model_name: the student directory (checkpoints
        record it with a hash of `cfg`).  student_method: its cache method (`Palu` with its checkpoint), or
        None for a model with its own latent cache (an MLA conversion).
      teacher: the teacher's name.  teacher_cfg: its config (None: `cfg`, the student's base).
      fake_quant: None, or a quantizer spec an MLA student's cache fake-quantizes its latents with (a
        straight-through round trip, `kvjax.states.mla.MLAKV.fake_quant`): training for the quantized
        cache it will run with (CLLA's int4 latent, `kvjax.clla`).
    The backbone is {"student": the base model's params, "teacher": the teacher's}.
    """

    cfg: LlamaConfig
    model_name: str
    student_method: Palu | None
    teacher: str
    teacher_cfg: LlamaConfig | None = None
    fake_quant: str | None = None
    name: ClassVar[str] = "distill"

    def __post_init__(self):
        teacher = self.teacher_cfg or self.cfg
        if teacher.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"teacher and student vocabularies differ ({teacher.vocab_size} vs {self.cfg.vocab_size} "
                             "tokens): distillation compares their next-token distributions")
        if self.student_method is not None:
            self.student_method.check(self.cfg)
        if self.fake_quant is not None:
            if getattr(self.cfg, "kv_layout", "dense") != "mla":
                raise ValueError("--fake-quant trains an MLA student's latents for a quantized cache; this student "
                                 "is not an MLA model (`kvjax convert mla|clla`)")
            quantizers.get(self.fake_quant).for_model(self.cfg)  # a bad spec or width fails here

    def meta(self) -> dict:
        out = {"method": self.name, "model": model_id(self.model_name, self.cfg)}
        return out if self.fake_quant is None else {**out, "fake_quant": self.fake_quant}

    def init(self, backbone, calib_tokens) -> tuple[dict, dict]:
        """(params: every layer's attention projections, from the student's base; const: the cache's bases)."""
        student = backbone["student"]
        params = {layer: {name: blocks["attn"][name] for name in TRAINED if name in blocks["attn"]}
                  for layer, blocks in student.items() if layer.startswith("layers_")}
        const = {}
        if self.student_method is not None:
            rk, rv = self.student_method.ranks(self.cfg, None)
            uk, uv = self.student_method.bases(self.cfg, self.model_name)
            const = {"uk": [u[..., :rk] for u in uk], "uv": [u[..., :rv] for u in uv]}
        return jax.tree_util.tree_map(lambda x: x.copy(), params), jax.tree_util.tree_map(jax.numpy.asarray, const)

    def student_logits(self, params, const, student, x):
        """Logits [B, T, V] of the student (the healed projections merged into its base) over its cache."""
        b, t = x.shape
        if self.fake_quant is not None:
            cache = mla_cache(self.cfg, b, t, fake_quant=quantizers.get(self.fake_quant).for_model(self.cfg))
        elif self.student_method is not None:
            cache = self.student_method.cache(self.cfg, const["uk"], const["uv"], b, t)
        else:
            cache = None
        return pipeline.forward(merge_healed(student, params), self.cfg, x, cache)[0]

    def loss(self, params, const, backbone, tokens, key):
        """KL(teacher || student) on tokens int32 [B, T + 1] (the first T are fed); `key` unused."""
        x, y = tokens[:, :-1], tokens[:, 1:]
        teacher = jax.lax.stop_gradient(pipeline.forward(backbone["teacher"], self.teacher_cfg or self.cfg, x)[0])
        student = self.student_logits(params, const, backbone["student"], x)
        kl = kl_divergence(teacher, student)
        return kl, {"kl": kl, "ce": cross_entropy(student, y)}

