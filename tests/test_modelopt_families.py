"""The family matrix against modelopt 0.47 itself, on the CPU (tests/modelopt_compare.py).

Every family of modelopt_compare.FAMILIES (tiny seeded models: hidden 64, 2 layers, bf16) under
every shipped recipe: every quantizer's name, enabled flag and amax (bits and dtype), every exported
tensor (name, dtype, shape, bytes), hf_quant_config.json and config.json equal to modelopt's; the
logits bit for bit for the FP8 recipes (modelopt's NVFP4 fake quant is a Triton kernel: the NVFP4
recipes' logits are compared on a GPU, by the CUDA test below or scripts/compare_families.py
--device cuda). The families refquant refuses raise a ValueError that names them.
"""

from __future__ import annotations

import pytest

import refquant as rq
from conftest import cuda, require_modelopt
import modelopt_compare as mc

FP8_RECIPES = ("fp8_default-fp8_cast_kv", "fp8_default-fp8_kv")
NVFP4_RECIPES = ("nvfp4_default-fp8_cast_kv", "nvfp4_default-nvfp4_cast_kv", "nvfp4_default-fp8_kv", "nvfp4_default-nvfp4_kv")


@pytest.fixture(scope="module")
def modelopt():
    require_modelopt()


@pytest.mark.parametrize("recipe", FP8_RECIPES + NVFP4_RECIPES)
@pytest.mark.parametrize("family", sorted(mc.FAMILIES))
def test_family_quantizes_and_exports_as_modelopt(modelopt, family, recipe):
    result = mc.compare_family(family, recipe)
    assert result.ok, result.summary()
    # the comparison saw something: calibrated quantizers, quantized weights in the checkpoint
    assert result.quantizers["amax_compared"] > 0 and result.export["weight_scales"] > 0
    if recipe in FP8_RECIPES:
        assert result.logits is not None and result.logits["identical"], result.summary()


@cuda
@pytest.mark.parametrize("recipe", FP8_RECIPES + NVFP4_RECIPES)
@pytest.mark.parametrize("family", sorted(mc.FAMILIES))
def test_family_matches_modelopt_on_cuda_logits_included(modelopt, family, recipe):
    """On a GPU (flavor modelopt-cuda) every recipe's logits are compared, NVFP4 included."""
    result = mc.compare_family(family, recipe, device="cuda", fake_quant_ops=True)
    assert result.ok and result.logits is not None and result.logits["identical"], result.summary()


def test_the_comparison_finds_a_changed_amax_and_changed_logits(modelopt):
    """The matrix's comparison is not blind: one amax made 1.5 times larger shows as an amax and
    a logits difference."""
    batches = mc.calibration_batches(1, 2, 2, 32)
    ours, other = mc.build_model("llama"), mc.build_model("llama")
    for model in (ours, other):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    quantizer = other.model.layers[0].self_attn.o_proj.input_quantizer
    quantizer.set_amax(quantizer.amax * 1.5)
    quantizers = mc.compare_quantizers(ours, other)
    assert not quantizers["ok"] and quantizers["amax_mismatch"][0].startswith("model.layers.0.self_attn.o_proj.input_quantizer")
    eval_batch = mc.calibration_batches(2, 1, 2, 32)[0]
    assert not mc.compare_logits(mc.logits_of(ours, eval_batch), mc.logits_of(other, eval_batch))["identical"]


@pytest.mark.parametrize("family", sorted(mc.UNSUPPORTED_FAMILIES))
def test_unsupported_family_is_refused_with_an_error_that_names_it(family):
    words = mc.UNSUPPORTED_FAMILIES[family][1]
    error = mc.refusal_of(family, "fp8_default-fp8_kv")
    assert error is not None, f"{family} was quantized without an error"
    assert all(word in error for word in words), error
