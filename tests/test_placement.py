"""Where insert_quantizers puts quantizers beyond linears and attention: modelopt's registry of
quantized module types (refquant.hf.placement, docs/modelopt_behaviour.md §12). The same models are
held to modelopt itself in tests/test_modelopt_families.py; these tests need no modelopt."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import refquant as rq
from refquant.hf import placement
from refquant.hf.ptq import insert_quantizers, named_quantizers
import modelopt_compare as mc

pytest.importorskip("transformers")
FP8 = "fp8_default-fp8_kv"


def test_a_subclass_that_overrides_forward_gets_no_quantizers_and_keeps_its_forward():
    """Gemma's embedding multiplies by embed_scale in its own forward; modelopt leaves it alone."""
    model = mc.build_model("gemma3")
    embedding = model.model.embed_tokens
    assert isinstance(embedding, nn.Embedding) and type(embedding).forward is not nn.Embedding.forward
    ids = mc.calibration_batches(1, 1, 2, 16)[0]
    original = mc.logits_of(model, ids)
    names = insert_quantizers(model)
    assert not any(name.startswith("model.embed_tokens.") for name in names)
    assert type(model.model.embed_tokens) is type(embedding)
    assert "lm_head.weight_quantizer" in names  # the tied head is a plain nn.Linear
    assert torch.equal(mc.logits_of(model, ids), original)  # every quantizer off: the same model


def test_tied_embedding_without_quantizers_is_not_in_exclude_modules():
    """modelopt's get_quant_config lists a layer only if its weight has a quantizer."""
    model = mc.build_model("gemma3")
    rq.quantize_model(model, rq.load_recipe(FP8), mc.calibration_batches(1, 1, 2, 16), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        rq.export_checkpoint(model, Path(tmp) / "ckpt")
        excluded = json.loads((Path(tmp) / "ckpt" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert excluded == ["lm_head"]


def test_layernorm_input_is_quantized_by_the_input_rule():
    """modelopt registers nn.LayerNorm with QuantInputBase: the recipes' `*input_quantizer` rule
    turns its input quantizer on, its output quantizer stays off."""
    model = mc.build_model("phi")
    report = rq.quantize_model(model, rq.load_recipe(FP8), mc.calibration_batches(1, 1, 2, 16), progress=False)
    norm = model.model.layers[0].input_layernorm
    assert isinstance(norm, nn.LayerNorm)
    assert norm.input_quantizer.is_enabled and not norm.output_quantizer.is_enabled
    row = report.row("model.layers.0.input_layernorm.input_quantizer")
    assert row.amax_source == "calibrated" and row.format == "fp8"


def test_layernorm_quantizers_wrap_its_forward():
    norm = nn.LayerNorm(32).to(torch.bfloat16)
    model = nn.Sequential(nn.Linear(32, 32).to(torch.bfloat16), norm)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    insert_quantizers(model)
    norm.input_quantizer.set_config(rq.QuantizerConfig(format="fp8"))
    norm.input_quantizer.set_amax(torch.tensor(2.0))
    expected = nn.functional.layer_norm(rq.fp8_fake_quant(x, 2.0), (32,), norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), expected)


def test_gpt2_conv1d_becomes_a_linear_with_its_weight_transposed_in_place():
    """modelopt's _QuantConv1D.convert: weight [in, out] -> [out, in], then its nn.Linear."""
    model = mc.build_model("gpt2")
    conv1d = model.transformer.h[0].attn.c_attn
    weight, bias = conv1d.weight.detach().clone(), conv1d.bias.detach().clone()
    names = insert_quantizers(model)
    assert conv1d is model.transformer.h[0].attn.c_attn and isinstance(conv1d, nn.Linear)
    assert conv1d.weight.shape == (weight.shape[1], weight.shape[0]) and conv1d.weight.is_contiguous()
    assert torch.equal(conv1d.weight, weight.t()) and torch.equal(conv1d.bias, bias)
    assert (conv1d.in_features, conv1d.out_features) == tuple(weight.shape)
    assert {f"transformer.h.0.attn.c_attn.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")} <= set(names)
    assert insert_quantizers(model) == names and conv1d.weight.shape == (weight.shape[1], weight.shape[0])


class ScaledLinear(nn.Linear):
    def forward(self, input):
        return super().forward(input) * 2


class RenamedLinear(nn.Linear):
    pass


def test_linear_subclasses_follow_modelopts_shared_forward_rule():
    model = nn.Sequential(nn.Linear(16, 16), ScaledLinear(16, 16), RenamedLinear(16, 16))
    names = insert_quantizers(model)
    assert {name.split(".")[0] for name in names} == {"0", "2"}
    assert placement.placement_kind(ScaledLinear(2, 2)) is None
    assert placement.placement_kind(RenamedLinear(2, 2)) == placement.LINEAR


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 1)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids):
        x = torch.nn.functional.one_hot(input_ids % 8, 8).float()
        return self.proj(self.conv(x.transpose(1, 2)).transpose(1, 2))


def test_a_module_type_refquant_does_not_implement_gets_modelopts_names_and_refuses_to_be_enabled():
    model = ConvThenLinear()
    names = insert_quantizers(model)
    assert {"conv.input_quantizer", "conv.weight_quantizer", "conv.output_quantizer"} <= set(names)
    batches = [torch.randint(0, 8, (1, 4))]
    with pytest.raises(ValueError, match=r"ConvThenLinear: the recipe turns on conv\..*Conv1d.*not supported.*\*\.conv\.\*"):
        rq.quantize_model(model, rq.load_recipe(FP8), batches, progress=False)


def test_a_module_type_refquant_does_not_implement_may_stay_off():
    model = ConvThenLinear()
    recipe = rq.load_recipe(FP8)
    off = rq.QuantRule("*conv*", enable=False)
    recipe = type(recipe)(**{**recipe.__dict__, "quant_cfg": [*recipe.quant_cfg, off]})
    report = rq.quantize_model(model, recipe, [torch.randint(0, 8, (1, 4))], progress=False)
    assert report.row("proj.weight_quantizer").enabled and not report.row("conv.weight_quantizer").enabled


def test_an_rnn_is_refused_at_insertion():
    model = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4))
    with pytest.raises(ValueError, match="GRU, which modelopt quantizes with its QuantRNN"):
        insert_quantizers(model)
    assert not named_quantizers(model)
