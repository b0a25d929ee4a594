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


def _quantized(family: str, recipe: str, backend: str):
    batches, eval_batch = mc.default_batches()
    model = mc.build_model(family)
    rq.quantize_model(model, rq.load_recipe(recipe), batches, backend=backend, progress=False)
    return model, eval_batch


@pytest.mark.parametrize("family, recipe, backend", CASES)
def test_a_folded_model_gives_the_bits_of_the_unfolded_one(family, recipe, backend):
    model, eval_batch = _quantized(family, recipe, backend)
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


def test_a_folded_model_refuses_export_calibration_and_a_weight_quantizer_switched_on(tmp_path):
    model, _ = _quantized("llama", "fp8_default-fp8_kv", "reference")
    unfolded = copy.deepcopy(model)
    rq.fold_weights(model)
    with pytest.raises(ValueError, match="cannot export.*folded"):
        rq.export_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="cannot export or compress.*folded"):
        rq.compress_weights(model)
    batches, _ = mc.default_batches()
    with pytest.raises(ValueError, match="folded"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    with pytest.raises(ValueError, match="cannot calibrate.*folded"):
        rq.quantize_model(model, None, batches, progress=False)
    quantizer = model.model.layers[0].mlp.down_proj.weight_quantizer
    with pytest.raises(ValueError, match="quantize them twice"):
        quantizer.set_enabled(True)
    assert copy.deepcopy(model).model.layers[0].mlp.down_proj.weight_quantizer.folded
    rq.export_checkpoint(unfolded, tmp_path / "unfolded")  # the copy made before folding exports


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
