"""Checkpoint tensors convert between modelopt's and compressed-tensors' NVFP4 and FP8 formats and
back to the same bytes; a scale the other convention cannot hold exactly raises ValueError."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from refquant.hf.export.convert import compressed_tensors_to_modelopt, modelopt_to_compressed_tensors, reciprocal_scale
from refquant.numerics import fp8_quantize, nvfp4_quantize
from refquant.numerics.nvfp4 import global_scale_from_amax


def representable_amax(start: float) -> float:
    """The first amax from `start` up whose amax / 2688 has an exact fp32 reciprocal."""
    amax = torch.tensor(start)
    while True:
        scale = global_scale_from_amax(amax, "modelopt-cpu")
        if (1.0 / (1.0 / scale)).view(torch.int32) == scale.view(torch.int32):
            return float(amax)
        amax = torch.nextafter(amax, torch.tensor(float("inf")))


def modelopt_tensors() -> dict[str, torch.Tensor]:
    """A modelopt checkpoint's tensors, as refquant.hf.export writes them: an NVFP4 and an FP8 linear."""
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(32, 64, generator=gen) * 0.02).bfloat16()
    weight_amax = representable_amax(float(weight.abs().max()))
    nvfp4 = nvfp4_quantize(weight, weight_amax)
    fp8 = fp8_quantize(weight, float(weight.abs().max()))
    input_amax = torch.tensor(representable_amax(3.7))
    return {
        "model.layers.0.mlp.up_proj.weight": nvfp4.packed,
        "model.layers.0.mlp.up_proj.weight_scale": nvfp4.block_scale,
        "model.layers.0.mlp.up_proj.weight_scale_2": nvfp4.global_scale.reshape(()),
        "model.layers.0.mlp.up_proj.input_scale": global_scale_from_amax(input_amax, "modelopt-cpu").reshape(()),
        "model.layers.0.self_attn.o_proj.weight": fp8.data,
        "model.layers.0.self_attn.o_proj.weight_scale": fp8.scale.float().reshape(()),
        "model.layers.0.self_attn.o_proj.input_scale": torch.tensor(0.0125),
        "model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.5),
        "model.embed_tokens.weight": weight,
    }


def test_modelopt_checkpoint_converts_to_compressed_tensors_and_back_to_the_same_bytes():
    original = modelopt_tensors()
    converted = modelopt_to_compressed_tensors(original)
    assert save(compressed_tensors_to_modelopt(converted)) == save(original)


def test_conversion_uses_compressed_tensors_names_and_its_encode_convention():
    original = modelopt_tensors()
    converted = modelopt_to_compressed_tensors(original)
    prefix = "model.layers.0.mlp.up_proj"
    assert {f"{prefix}.weight_packed", f"{prefix}.weight_global_scale", f"{prefix}.input_global_scale"} <= set(converted)
    assert f"{prefix}.weight_scale_2" not in converted and f"{prefix}.weight" not in converted
    assert torch.equal(converted[f"{prefix}.weight_packed"], original[f"{prefix}.weight"])
    global_scale = converted[f"{prefix}.weight_global_scale"]
    assert global_scale.shape == (1,) and global_scale.dtype == torch.float32
    # The runtime's 1 / G is modelopt's decode scale, bit for bit.
    assert (1.0 / global_scale).view(torch.int32) == original[f"{prefix}.weight_scale_2"].reshape(1).view(torch.int32)
    assert converted["model.layers.0.self_attn.o_proj.weight_scale"].shape == (1,)


def test_compressed_tensors_checkpoint_converts_to_modelopt_and_back_to_the_same_bytes():
    ct = modelopt_to_compressed_tensors(modelopt_tensors())
    assert save(modelopt_to_compressed_tensors(compressed_tensors_to_modelopt(ct))) == save(ct)


def test_a_scale_without_an_exact_reciprocal_is_refused_with_its_name_and_bits():
    tensors = modelopt_tensors()
    tensors["model.layers.0.mlp.up_proj.weight_scale_2"] = torch.tensor(0x443CCFD8, dtype=torch.int32).view(torch.float32)
    with pytest.raises(ValueError, match=r"up_proj.weight_scale_2 = 755.24755859375 \(fp32 0x443CCFD8\)"):
        modelopt_to_compressed_tensors(tensors)
    relaxed = modelopt_to_compressed_tensors(tensors, exact=False)
    assert relaxed["model.layers.0.mlp.up_proj.weight_global_scale"].item() == pytest.approx(1 / 755.24755859375)


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan"), -1.0])
def test_a_scale_that_cannot_be_inverted_is_refused(bad):
    with pytest.raises(ValueError, match="finite and > 0"):
        reciprocal_scale(torch.tensor(bad), "x.weight_scale_2")


def test_per_channel_fp8_scales_have_no_modelopt_form():
    tensors = {"l.weight": torch.zeros(4, 16, dtype=torch.float8_e4m3fn), "l.weight_scale": torch.ones(4, 1)}
    with pytest.raises(ValueError, match="per-channel"):
        compressed_tensors_to_modelopt(tensors)
