"""modelopt 0.47's NVFP4 and FP8, as dialects: thin entries over refquant.numerics, which is this
stack's reference (docs/modelopt_behaviour.md says what modelopt does, step by step).

Two NVFP4 dialects, because modelopt has two paths that differ in bits (docs/numerics.md):
- "modelopt-kernel": the Triton fake-quant kernel fp4_fake_quant_block (TensorQuantizer in PTQ),
  refquant.numerics.nvfp4.nvfp4_fake_quant;
- "modelopt-qtensor": NVFP4QTensor.quantize / dequantize (export, compression),
  refquant.numerics.nvfp4.nvfp4_quantize, global scale per the "modelopt-cpu" flavor.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, Flavor, as_amax_tensor, max_abs
from ..numerics.fp8 import fp8_fake_quant, fp8_fake_quant_scales, fp8_quantize, saturating_e4m3
from ..numerics.gpu_division import approx_reciprocal_fp32
from ..numerics.nvfp4 import (
    _global_amax,
    global_scale_from_amax,
    nan_ignoring_block_max,
    nvfp4_fake_block_scale_detail,
    nvfp4_fake_quant,
    nvfp4_quantize,
)
from ..numerics.formats import E4M3_DTYPE, E4M3_MAX, NVFP4_GLOBAL_SCALE_FLOOR
from .common import FP8Steps, NVFP4Steps, blocks_of, e2m1_codes_nearest_even


def nvfp4_kernel_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """modelopt's NVFP4 fake-quant kernel, step by step; `dequantized` is
    refquant.numerics.nvfp4_fake_quant(x, global_amax) itself.

    The kernel stores no codes: `block_scale` is its E4M3 rounding e of min(m / fl(6 g'), 448), and
    `codes` are the E2M1 roundings of |x| / S it multiplies back (sign bit where x is not >= 0).
    """
    dequantized = nvfp4_fake_quant(x, global_amax)
    global_scale = global_scale_from_amax(_global_amax(x, global_amax), "modelopt-cuda")
    blocks = blocks_of(x)
    magnitude = blocks.abs()
    block_amax = nan_ignoring_block_max(magnitude)
    detail = nvfp4_fake_block_scale_detail(block_amax, global_scale)
    clamped = torch.where(detail.ideal < E4M3_MAX, detail.ideal, E4M3_MAX)
    quotient = magnitude * approx_reciprocal_fp32(detail.scale)
    codes = e2m1_codes_nearest_even(quotient, ~(blocks >= 0))
    g = torch.where(global_scale > 0, global_scale, torch.full_like(global_scale, NVFP4_GLOBAL_SCALE_FLOOR))
    return NVFP4Steps("modelopt-kernel", g, False, block_amax, clamped.to(E4M3_DTYPE).squeeze(-1),
                      torch.where(blocks >= 0, quotient, -quotient), codes, dequantized)


def nvfp4_qtensor_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """modelopt's NVFP4QTensor (flavor "modelopt-cpu"), step by step: refquant.numerics.nvfp4_quantize
    and its dequantize(); `quotient` is x / fl(fp32(block scale) * global scale)."""
    tensor = nvfp4_quantize(x, global_amax)
    blocks = blocks_of(x)
    divisor = tensor.block_scale.float().unsqueeze(-1) * tensor.global_scale
    quotient = torch.where((blocks == 0) & (divisor == 0), torch.zeros_like(blocks), blocks / divisor)
    codes = tensor.codes().unflatten(-1, (-1, blocks.shape[-1]))
    return NVFP4Steps("modelopt-qtensor", tensor.global_scale, False, blocks.abs().amax(-1, keepdim=True),
                      tensor.block_scale, quotient, codes, tensor.dequantize())


def fp8_steps(x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu") -> FP8Steps:
    """modelopt's FP8 fake quant, per tensor or (a keep-dims amax) per channel: data =
    E4M3(x * scale) with scale per `flavor` (refquant.numerics.fp8.fp8_fake_quant_scales);
    `dequantized` = refquant.numerics.fp8_fake_quant; `scale` the inverse scale rcp(scale)."""
    dequantized = fp8_fake_quant(x, amax, flavor=flavor)
    amax_tensor = max_abs(x) if amax is None else as_amax_tensor(amax, x)
    scale, inverse = fp8_fake_quant_scales(amax_tensor, flavor)
    quotient = x.float() * scale
    return FP8Steps("modelopt" if flavor == "modelopt-cpu" else "modelopt-cuda", inverse, quotient,
                    saturating_e4m3(quotient), dequantized)


def fp8_cuda_steps(x: torch.Tensor, amax: AmaxLike = None) -> FP8Steps:
    """fp8_steps under the "modelopt-cuda" flavor (modelopt's CUDA extension: 448 / amax, one division)."""
    return fp8_steps(x, amax, flavor="modelopt-cuda")


def fp8_real_steps(x: torch.Tensor, amax: AmaxLike = None) -> FP8Steps:
    """modelopt's FP8QTensor path (refquant.numerics.fp8_quantize): scale = amax / 448."""
    tensor = fp8_quantize(x, amax)
    quotient = x.float() / tensor.scale.float()
    return FP8Steps("modelopt-qtensor", tensor.scale, quotient, tensor.data, tensor.dequantize())


__all__ = ["fp8_cuda_steps", "fp8_real_steps", "fp8_steps", "nvfp4_kernel_steps", "nvfp4_qtensor_steps"]
