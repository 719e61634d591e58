"""The model-family registry (`kvjax.models.family`): dispatch by config class and by architecture name,
clear errors, and a new family added with one `register_family` call loading end to end."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from numpy_llama import forward
from safetensors.numpy import save_file
from test_checkpoints import HF_VOCAB, LLAMA, prompt_ids, random_hf_weights, write_hf_dir

import kvjax
from kvjax import weights
from kvjax.models import (Llama, LlamaConfig, config_from_gguf, config_from_hf, families, family, family_named,
                          family_of, llama_weights, model_for, register_family)
from kvjax.testing import tiny_config


def test_llama_family_is_registered_with_its_names():
    (llama,) = [f for f in families() if f.name == "llama"]
    assert llama.config_cls is LlamaConfig and llama.module_cls is Llama and llama.weights is llama_weights.WEIGHTS
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(llama.hf_architectures)
    assert {"llama", "qwen2"} <= set(llama.gguf_architectures)
    cfg = tiny_config()
    assert model_for(cfg) is Llama and family_of(cfg) is llama and family_named("llama") is llama
    assert config_from_hf(LLAMA).n_layers == LLAMA["num_hidden_layers"]


def test_unknown_names_raise_listing_the_registered_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        config_from_hf({**LLAMA, "architectures": ["GPT2LMHeadModel"]})
    assert "LlamaForCausalLM" in str(e.value) and "config.json" in str(e.value)
    with pytest.raises(ValueError, match="falcon") as e:
        config_from_gguf({"general.architecture": "falcon"}, set())
    assert "'llama'" in str(e.value) and "'gemma3'" in str(e.value) and "GGUF" in str(e.value)

    @dataclasses.dataclass(frozen=True)
    class Unregistered(LlamaConfig):
        pass

    with pytest.raises(ValueError, match="Unregistered") as e:
        model_for(Unregistered(**dataclasses.asdict(tiny_config())))
    assert "LlamaConfig" in str(e.value)
    with pytest.raises(ValueError, match="no-such-family"):
        family_named("no-such-family")


def test_registering_a_taken_name_raises(monkeypatch):
    monkeypatch.setattr(family, "_FAMILIES", dict(family._FAMILIES))
    with pytest.raises(ValueError, match="LlamaConfig"):
        register_family(LlamaConfig, Llama, name="other", weights=llama_weights.WEIGHTS)

    @dataclasses.dataclass(frozen=True)
    class Other(LlamaConfig):
        pass

    with pytest.raises(ValueError, match="'MistralForCausalLM'"):
        register_family(Other, Llama, name="other", weights=llama_weights.WEIGHTS,
                        hf_architectures=("MistralForCausalLM",))
    with pytest.raises(ValueError, match="'llama'"):
        register_family(Other, Llama, name="llama", weights=llama_weights.WEIGHTS)
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2'"):
        register_family(Other, Llama, name="other", weights=llama_weights.WEIGHTS, gguf_architectures=("qwen2",))
    assert [f.name for f in families()] == [f.name for f in family._FAMILIES.values()]


# ------------------------------------------------------------------------------ a new family, end to end
@dataclasses.dataclass(frozen=True)
class ToyConfig(LlamaConfig):
    """A 'new' family: Llama's fields, its own config.json architecture and tensor names."""

    @classmethod
    def from_hf_config(cls, hf, dtype: str = "float32"):
        return super().from_hf_config({**hf, "architectures": ["LlamaForCausalLM"]}, dtype=dtype)


class Toy(Llama):
    pass


TOY_LAYER = {k.replace("self_attn.", "attention.").replace("mlp.", "ffn."): v
             for k, v in llama_weights.HF_LAYER.items()}
TOY_TOP = {"transformer.wte.weight": ("embed/embedding", False), "transformer.ln_f.weight": ("final_norm/scale", False),
           "head.weight": ("lm_head/kernel", True)}
TOY_WEIGHTS = family.WeightNames(hf_top=TOY_TOP, hf_layer=TOY_LAYER, gguf_top={}, gguf_layer={},
                                 expected_keys=llama_weights.expected_keys, hf_layer_prefix="transformer.blocks.",
                                 redundant=llama_weights.redundant)


def _toy_names(hf_weights: dict) -> dict:
    """The Llama-named tensors renamed as the toy family names them."""
    top = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight",
           "lm_head.weight": "head.weight"}
    out = {}
    for name, arr in hf_weights.items():
        if name in top:
            out[top[name]] = arr
        else:
            idx, _, suffix = name[len("model.layers."):].partition(".")
            out[f"transformer.blocks.{idx}." + suffix.replace("self_attn.", "attention.").replace("mlp.", "ffn.")] = arr
    return out


def test_a_new_family_is_one_register_call(tmp_path, monkeypatch):
    monkeypatch.setattr(family, "_FAMILIES", dict(family._FAMILIES))
    register_family(ToyConfig, Toy, name="toy", weights=TOY_WEIGHTS, hf_architectures=("ToyForCausalLM",))

    w = random_hf_weights(LLAMA, seed=21)
    hf = {**LLAMA, "architectures": ["ToyForCausalLM"]}
    lm = kvjax.load(str(write_hf_dir(tmp_path / "toy", hf, _toy_names(w))))
    assert type(lm.cfg) is ToyConfig and model_for(lm.cfg) is Toy and family_of(lm.cfg).name == "toy"
    ids = prompt_ids(17, 3, HF_VOCAB)
    np.testing.assert_allclose(lm.logits(ids), forward(w, LLAMA, ids), atol=1e-4, rtol=0)

    # the Llama names are unexpected tensors for the toy family, and the other way round
    with pytest.raises(ValueError, match="unexpected tensor .(lm_head|model)"):
        kvjax.load(str(write_hf_dir(tmp_path / "wrong", hf, w)))
    with pytest.raises(ValueError, match="unexpected tensor .(head|transformer)"):
        kvjax.load(str(write_hf_dir(tmp_path / "wrong2", LLAMA, _toy_names(w))))

    # the converted-checkpoint cache records the family and rebuilds its config class
    flat = dict(weights.hf_to_flat(lm.cfg, _toy_names(w).items()))
    weights.save_flat(str(tmp_path / "toy.safetensors"), flat, lm.cfg)
    cfg, params = weights.load_flat(str(tmp_path / "toy.safetensors"))
    assert type(cfg) is ToyConfig and cfg == lm.cfg
    assert set(weights.unflatten(flat)) == set(params)


def test_converted_cache_without_a_family_is_llama(tmp_path):
    """Checkpoints converted before families were recorded (only `kvjax_config`) still load, as Llama."""
    cfg = config_from_hf(LLAMA)
    flat = dict(weights.hf_to_flat(cfg, random_hf_weights(LLAMA, seed=2).items()))
    save_file(flat, str(tmp_path / "old.safetensors"),
              metadata={"kvjax_config": json.dumps(weights._cfg_to_json(cfg))})
    loaded, _ = weights.load_flat(str(tmp_path / "old.safetensors"))
    assert type(loaded) is LlamaConfig and loaded == cfg
