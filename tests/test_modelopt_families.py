"""The family matrix against modelopt 0.47 itself (tests/modelopt_compare.py), dense and MoE.

Every family of modelopt_compare.FAMILIES (tiny seeded models: hidden 64, 2 layers, bf16; the MoE
ones with 4 experts, top-2) under the shipped recipes: every quantizer's name, enabled flag and amax
(bits and dtype), every exported tensor (name, dtype, shape, bytes), hf_quant_config.json and
config.json equal to modelopt's; the logits bit for bit for the FP8 recipes. On a CPU, modelopt's
NVFP4 fake quant cannot run (a Triton kernel), so the NVFP4 recipes compare calibration and export;
their logits are compared by the CUDA test below (every family, every recipe, flavor
modelopt-cuda) or `scripts/compare_families.py --device cuda`. The families refquant refuses raise
a ValueError that names them.

CI runs every family with every recipe on the CPU: a comparison takes a fraction of a second on
these models (the whole matrix, test_experts.py and test_placement.py together about a minute on
one thread).
"""

from __future__ import annotations

import copy

import pytest
import torch

import refquant as rq
from refquant.hf.export import read_checkpoint_tensors
from conftest import cuda
import modelopt_compare as mc

PAIRS = [(family, recipe) for family in mc.FAMILIES for recipe in mc.RECIPES]


@pytest.mark.parametrize("family,recipe", PAIRS)
def test_family_quantizes_and_exports_as_modelopt(modelopt, family, recipe):
    result = mc.compare_family(family, recipe)
    assert result.ok, result.summary()
    # the comparison saw something: calibrated quantizers, quantized weights in the checkpoint
    assert result.quantizers["amax_compared"] > 0 and result.export["weight_scales"] > 0
    if family in mc.MOE_FAMILIES:  # the experts are quantized, not only the attention
        assert result.quantizers["expert_amax_compared"] > 0 and result.export["expert_weight_scales"] > 0, result.summary()
    if recipe in mc.FP8_RECIPES:
        assert result.logits is not None and result.logits["identical"], result.summary()


@cuda
@pytest.mark.parametrize("family,recipe", PAIRS)
def test_family_matches_modelopt_on_cuda_logits_included(modelopt, family, recipe):
    """On a GPU (flavor modelopt-cuda) every recipe's logits are compared, NVFP4 included."""
    result = mc.compare_family(family, recipe, device="cuda", fake_quant_ops=True)
    assert result.ok and result.logits is not None and result.logits["identical"], result.summary()


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss"])
def test_each_quantizer_gives_modelopts_bits_on_the_same_input(modelopt, family):
    """The per-operation comparison the CUDA runs report (fake_quant_ops), here with FP8 on the
    CPU: every enabled quantizer of both models applied to what refquant's received; the experts'
    shared input quantizers, called once per expert, included."""
    result = mc.compare_family(family, "fp8_default-fp8_kv", fake_quant_ops=True)
    ops = result.fake_quant_ops
    assert result.ok and ops["weight_elements"] > 0 and ops["activation_elements"] > 0, result.summary()
    assert ops["weight_elements_differing"] == 0 and ops["activation_elements_differing"] == 0, ops


def test_the_comparison_finds_a_changed_amax_and_changed_logits(modelopt):
    """The matrix's comparison is not blind: one amax made 1.5 times larger shows as an amax and
    a logits difference."""
    batches, eval_batch = mc.default_batches()
    ours, other = mc.build_model("llama"), mc.build_model("llama")
    for model in (ours, other):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches, progress=False)
    quantizer = other.model.layers[0].self_attn.o_proj.input_quantizer
    quantizer.set_amax(quantizer.amax * 1.5)
    quantizers = mc.compare_quantizers(ours, other)
    assert not quantizers["ok"] and quantizers["amax_mismatch"][0].startswith("model.layers.0.self_attn.o_proj.input_quantizer")
    assert not mc.compare_logits(mc.logits_of(ours, eval_batch), mc.logits_of(other, eval_batch))["identical"]


def test_gpt_neox_checkpoint_names_its_head_embed_out_and_loads_back(modelopt, tmp_path):
    """GPT-NeoX's head is `lm_head` in memory and `embed_out` in its checkpoints (transformers
    renames it on load): the export writes `embed_out`, as modelopt does, and load_checkpoint
    reads it back as the compressed model."""
    result = mc.compare_family("gpt_neox", "nvfp4_default-fp8_kv", workdir=tmp_path)
    assert result.ok, result.summary()
    folder = tmp_path / "gpt_neox-nvfp4_default-fp8_kv-refquant"
    tensors = read_checkpoint_tensors(folder)
    assert "embed_out.weight" in tensors and not any(key.startswith("lm_head.") for key in tensors)

    batches, eval_batch = mc.default_batches()
    model = mc.build_model("gpt_neox")
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_kv"), batches, progress=False)
    compressed = copy.deepcopy(model)
    rq.compress_weights(compressed)
    reloaded = rq.load_checkpoint(folder)
    assert torch.equal(mc.logits_of(reloaded, eval_batch), mc.logits_of(compressed, eval_batch))


@pytest.mark.parametrize("family", sorted(mc.UNSUPPORTED_FAMILIES))
def test_unsupported_family_is_refused_with_an_error_that_names_it(family):
    words = mc.UNSUPPORTED_FAMILIES[family][1]
    error = mc.refusal_of(family, "fp8_default-fp8_kv")
    assert error is not None, f"{family} was quantized without an error"
    assert all(word in error for word in words), error
