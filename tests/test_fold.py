"""rq.fold_weights: each fake-quantized weight stored in place of its master weight, for evaluation.

The folded model's forward gives the unfolded one's bits (dense layers, fused experts of both
layouts, the reference and the compiled backend); what needs the master weights (export,
calibration, switching a weight quantizer back on) refuses a folded model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import modelopt_compare as mc
from conftest import cuda
import refquant as rq
from refquant.quant.quantizer import named_quantizers
from refquant.testing import assert_bitexact

CASES = [
    ("llama", "fp8_default-fp8_kv", "reference"),
    ("llama", "nvfp4_default-fp8_cast_kv", "reference"),
    ("llama", "fp8_default-fp8_kv", "compiled"),
    ("qwen3_moe_top4", "nvfp4_default-fp8_kv", "reference"),
    ("qwen3_moe_top4", "fp8_default-fp8_kv", "compiled"),
    ("gpt_oss", "fp8_default-fp8_kv", "reference"),
]


def _quantized(family: str, recipe: str, backend: str, device: str = "cpu"):
    batches, eval_batch = mc.default_batches()
    model = mc.build_model(family, device=device)
    flavor = "modelopt-cuda" if device == "cuda" else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(recipe), batches, backend=backend, flavor=flavor, progress=False)
    return model, eval_batch.to(device)


CUDA_CASES = [pytest.param(family, recipe, "compiled", "cuda", marks=cuda)
              for family in ("llama", "qwen3_moe_top4") for recipe in ("fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv")]


@pytest.mark.parametrize("family, recipe, backend, device", [(*case, "cpu") for case in CASES] + CUDA_CASES)
def test_a_folded_model_gives_the_bits_of_the_unfolded_one(family, recipe, backend, device):
    model, eval_batch = _quantized(family, recipe, backend, device)
    with torch.no_grad():
        want = model(input_ids=eval_batch).logits
    weight_quantizers = [name for name, q in named_quantizers(model) if q.is_enabled and "weight_quantizer" in name]
    folded = rq.fold_weights(model)
    assert sorted(folded) == sorted(weight_quantizers) and folded
    assert not any(q.is_enabled for name, q in named_quantizers(model) if "weight_quantizer" in name)
    with torch.no_grad():
        assert_bitexact(model(input_ids=eval_batch).logits, want, f"{family} {recipe} {backend}: logits after folding")
    assert rq.fold_weights(model) == []  # nothing left to fold: the weights are not quantized twice
    with torch.no_grad():
        assert_bitexact(model(input_ids=eval_batch).logits, want, "logits after folding twice")


def _state(model) -> tuple:
    """What a refusal must leave as it was: every quantizer's config and amax, every weight."""
    quantizers = [(name, q.config, None if q.amax is None else q.amax.clone()) for name, q in named_quantizers(model)]
    return quantizers, {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, state, eval_batch, logits, what: str) -> None:
    quantizers, parameters = _state(model)
    for (name, config, amax), (_, config_now, amax_now) in zip(state[0], quantizers):
        assert config_now == config and (amax is None) == (amax_now is None), f"{what}: {name}"
        assert amax is None or torch.equal(amax, amax_now), f"{what}: {name}'s amax"
    assert all(torch.equal(parameters[name], p) for name, p in state[1].items()), f"{what}: a weight changed"
    with torch.no_grad():
        assert_bitexact(model(input_ids=eval_batch).logits, logits, f"logits after {what}")


def test_a_folded_model_refuses_what_needs_its_master_weights_and_stays_as_it_was(tmp_path):
    from refquant.hf.sensitivity import measure_sensitivity

    model, eval_batch = _quantized("llama", "fp8_default-fp8_kv", "reference")
    unfolded = copy.deepcopy(model)
    rq.fold_weights(model)
    with torch.no_grad():
        logits = model(input_ids=eval_batch).logits
    state = _state(model)
    batches, _ = mc.default_batches()
    refusals = [
        ("export", "cannot export.*folded", lambda: rq.export_checkpoint(model, tmp_path / "out")),
        ("compress", "cannot export or compress.*folded", lambda: rq.compress_weights(model)),
        ("quantize", "cannot apply recipe .*folded",
         lambda: rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)),
        ("apply_recipe", "cannot apply recipe .*folded", lambda: rq.apply_recipe(model, rq.load_recipe("nvfp4_default-fp8_kv"))),
        ("calibrate", "cannot calibrate.*folded", lambda: rq.quantize_model(model, None, batches, progress=False)),
        ("sensitivity", "cannot measure the sensitivity.*folded", lambda: measure_sensitivity(model, eval_batch, progress=False)),
        ("enable", "quantize them twice", lambda: model.model.layers[0].mlp.down_proj.weight_quantizer.set_enabled(True)),
    ]
    for what, message, call in refusals:
        with pytest.raises(ValueError, match=message):
            call()
        _assert_unchanged(model, state, eval_batch, logits, what)
    assert not (tmp_path / "out").exists()
    assert copy.deepcopy(model).model.layers[0].mlp.down_proj.weight_quantizer.folded
    rq.export_checkpoint(unfolded, tmp_path / "unfolded")  # the copy made before folding exports


def test_folding_while_calibration_runs_is_refused():
    model = mc.build_model("llama")
    rq.insert_quantizers(model)
    quantizer = model.model.layers[0].mlp.up_proj.weight_quantizer
    quantizer.set_config(rq.QuantizerConfig(format="fp8", use_constant_amax=True))  # collects nothing
    quantizer.start_calibration()
    with pytest.raises(ValueError, match="still calibrating"):
        rq.fold_weights(model)
    assert not quantizer.folded and quantizer.is_enabled


def test_folding_a_weight_tied_to_another_module_is_refused_before_anything_changes():
    model = mc.build_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    rq.insert_quantizers(model)
    model.lm_head.weight_quantizer.set_config(rq.QuantizerConfig(format="fp8"))
    model.lm_head.weight_quantizer.set_amax(model.lm_head.weight.detach().abs().amax())
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        rq.fold_weights(model)
    assert torch.equal(model.lm_head.weight, before) and model.lm_head.weight_quantizer.is_enabled
