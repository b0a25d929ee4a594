"""The checkpoint tensors of one quantized linear, and the weight a runtime reads back from them;
every number computed by refquant's numerics in the quantizers' flavor."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...numerics.formats import E2M1_MAX, E4M3_MAX
from ...numerics.fp8 import FP8Tensor, divide_by_448, fp8_quantize
from ...numerics.nvfp4 import NVFP4Tensor, global_scale_from_amax, nvfp4_quantize
from ...quant.quantizer import TensorQuantizer, child_quantizer


def _export_amax(amax: torch.Tensor, maxbound: float, clamp: bool) -> torch.Tensor:
    """modelopt's TensorQuantizer.export_amax: zero or NaN amax -> maxbound (a layer calibration
    never reached; 448 for FP8, 6 for NVFP4); FP8 also clamps to [tiny, max] of the amax dtype."""
    amax = torch.where(amax == 0, torch.full_like(amax, maxbound), amax)
    amax = torch.nan_to_num(amax, nan=maxbound)
    if clamp:
        info = torch.finfo(amax.dtype)
        amax = amax.clamp(min=info.tiny, max=info.max)
    return amax


def fp8_scale(amax: torch.Tensor, flavor: str) -> torch.Tensor:
    """fp32 amax / 448 per flavor: modelopt's `amax.float() / 448.0` (docs/modelopt_behaviour.md §2.4)."""
    return divide_by_448(amax.float(), flavor)


def fp8_weight_scale(weight_amax: torch.Tensor, flavor: str) -> torch.Tensor:
    """An FP8 weight's 0-d fp32 weight_scale: modelopt's export_amax first (a zero or NaN amax, a
    weight that is all zeros, becomes 448, so the scale is 1.0; clamped to the amax dtype's range),
    then / 448 per flavor."""
    return fp8_scale(_export_amax(weight_amax, E4M3_MAX, clamp=True), flavor).reshape(())


def export_linear_tensors(
    name: str, module: nn.Module, fmt: str, weight_amax: torch.Tensor, input_amax: Optional[torch.Tensor], flavor: str
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (modelopt's _export_quantized_weight).

    weight_amax / input_amax: the amaxes after fusion. The weight is quantized in its own dtype.
    """
    weight = module.weight.detach()
    input_q = child_quantizer(module, "input_quantizer")
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "fp8":
        weight_scale = fp8_weight_scale(weight_amax, flavor)
        tensors["weight"] = fp8_quantize(weight, scale=weight_scale, flavor=flavor).data
        tensors["weight_scale"] = weight_scale
    else:
        quantized = nvfp4_quantize(weight, amax=weight_amax.reshape(()), flavor=flavor)
        tensors["weight"] = quantized.packed
        tensors["weight_scale"] = quantized.block_scale
        tensors["weight_scale_2"] = quantized.global_scale.reshape(())
    input_scale = export_input_scale(fmt, input_q, input_amax, flavor)
    if input_scale is not None:
        tensors["input_scale"] = input_scale
    return tensors


def writes_input_scale(fmt: str, input_q: Optional[TensorQuantizer]) -> bool:
    """Whether a quantized linear of format `fmt` with this input quantizer gets an input_scale
    (modelopt's rule): FP8 whenever the input quantizer holds a calibrated amax (on or off); NVFP4
    when it is on and has an amax (a constant one included); W4A16 never."""
    if input_q is None:
        return False
    if fmt == "fp8":
        return input_q.is_calibrated
    return fmt == "nvfp4" and input_q.is_enabled and input_q.amax is not None


def export_input_scale(
    fmt: str, input_q: Optional[TensorQuantizer], input_amax: Optional[torch.Tensor], flavor: str
) -> Optional[torch.Tensor]:
    """A quantized linear's fp32 0-d input_scale, or None where modelopt writes none
    (writes_input_scale). FP8: the input quantizer's amax / 448; NVFP4: amax / (6 * 448) from
    `input_amax`, the (fused) input amax the plan gives wherever a scale is written."""
    if not writes_input_scale(fmt, input_q):
        return None
    if fmt == "fp8":
        return fp8_scale(_export_amax(input_q.amax, E4M3_MAX, clamp=True), flavor).reshape(())
    sanitized = _export_amax(input_amax, E2M1_MAX, clamp=False)
    return global_scale_from_amax(sanitized.float(), flavor).reshape(())


def dequantize_linear_weight(fmt: str, tensors: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight a checkpoint layer holds, as the nearest `dtype` values: code * scale formed in
    fp32 (as a runtime's GEMM applies its fp32 scales), rounded once to `dtype`. (modelopt's
    FP8QTensor.dequantize multiplies in `dtype`, rounding the scale first; we do not copy that.)"""
    if fmt == "fp8":
        fp8 = FP8Tensor(data=tensors["weight"], scale=tensors["weight_scale"], dtype=torch.float32)
        return fp8.dequantize().to(dtype)
    return NVFP4Tensor(
        packed=tensors["weight"],
        block_scale=tensors["weight_scale"],
        global_scale=tensors["weight_scale_2"],
        shape=torch.Size(shape),
        dtype=dtype,
    ).dequantize()
