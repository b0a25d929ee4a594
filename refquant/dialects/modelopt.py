"""modelopt 0.47's NVFP4, FP8 and MX, as dialects: thin entries over refquant.numerics, which is this
stack's reference for NVFP4 and FP8 (docs/modelopt_behaviour.md says what modelopt does, step by
step), and its MX real quant written out here (modelopt/torch/quantization/qtensor/mxfp4_tensor.py
MXFP4QTensor, mxfp8_tensor.py MXFP8QTensor: both pure PyTorch).

Two NVFP4 dialects, because modelopt has two paths that differ in bits (docs/numerics.md):
- "modelopt-kernel": the Triton fake-quant kernel fp4_fake_quant_block (TensorQuantizer in PTQ),
  refquant.numerics.nvfp4.nvfp4_fake_quant;
- "modelopt-qtensor": NVFP4QTensor.quantize / dequantize (export, compression),
  refquant.numerics.nvfp4.nvfp4_quantize, global scale per the "modelopt-cpu" flavor.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, Flavor, as_amax_tensor, check_float_input, max_abs
from ..numerics.fp8 import fp8_fake_quant, fp8_fake_quant_scales, fp8_quantize, saturating_e4m3
from ..numerics.gpu_division import approx_reciprocal_fp32
from ..numerics.nvfp4 import (
    global_scale_from_amax,
    nan_ignoring_block_max,
    nvfp4_fake_block_scale_detail,
    nvfp4_fake_quant,
    nvfp4_quantize,
    resolve_global_amax,
)
from ..numerics.formats import (
    E2M1_DECISION_POINTS,
    E2M1_MAX,
    E2M1_SIGN_BIT,
    E4M3_DTYPE,
    E4M3_MAX,
    E8M0_BIAS,
    NVFP4_GLOBAL_SCALE_FLOOR,
)
from .common import FP8Steps, NVFP4Steps, blocks_of, e2m1_codes_nearest_even, e2m1_values
from .mx import MXSteps, mx_blocks, unblock


def nvfp4_kernel_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """modelopt's NVFP4 fake-quant kernel, step by step; `dequantized` is
    refquant.numerics.nvfp4_fake_quant(x, global_amax) itself.

    The kernel stores no codes: `block_scale` is its E4M3 rounding e of min(m / fl(6 g'), 448), and
    `codes` are the E2M1 roundings of |x| / S it multiplies back (sign bit where x is not >= 0).
    """
    dequantized = nvfp4_fake_quant(x, global_amax)
    global_scale = global_scale_from_amax(resolve_global_amax(x, global_amax), "modelopt-cuda")
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


def e2m1_codes_ties_toward_zero(quotient: torch.Tensor) -> torch.Tensor:
    """MXFP4QTensor's cast_fp4: the magnitude index is the number of decision points (0.25, 0.75,
    ... 5) that |q| exceeds, so a tie rounds toward zero and |q| > 5 gives 6; the sign bit is
    (2 - sign(q)) // 2, which is 1 for a negative q and for a q that is zero of either sign (so
    x = +0.0 gets code 8 and dequantizes to -0.0; a small positive q rounds to code 0, +0.0)."""
    points = torch.tensor(E2M1_DECISION_POINTS, dtype=torch.float32, device=quotient.device)
    index = ((quotient.abs().unsqueeze(-1) - points) > 0).sum(dim=-1)
    sign_bit = (2 - torch.sign(quotient)) // 2
    return (sign_bit * E2M1_SIGN_BIT + index).to(torch.uint8)


def mxfp4_qtensor_steps(x: torch.Tensor) -> MXSteps:
    """modelopt's MXFP4QTensor.quantize(x, 32) and dequantize(), step by step.

    x: fp32, bf16 or fp16, finite, last dim a multiple of 32 (modelopt views x as (-1, 32), so
    other lengths would make blocks that straddle rows; refquant refuses them). NaN and inf are
    refused: modelopt's scale is then a float NaN or inf converted to uint8, which C++ leaves
    undefined.

    Order:
      amax = max|fp32(block)|;  d = amax / 6 (IEEE)
      e = ceil(max(log2(d), -127))               (torch.log2; a zero block gets -127)
      q = fp32(x) / 2**e                         (torch.exp2)
      codes = e2m1_codes_ties_toward_zero(q); scale byte = e + 127
    dequantize: fl(sign * E2M1 value * 2**(byte - 127)) in fp32, then x's dtype (x = +0.0 comes out -0.0).
    """
    check_float_input(x)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("modelopt's MXFP4QTensor turns a NaN or inf block's scale into a uint8 by a float cast that "
                         "C++ leaves undefined; refquant models finite x only. Drop or replace the non-finite values.")
    blocks = mx_blocks(x, "modelopt's MXFP4QTensor", pads=False)
    block_amax = blocks.float().abs().amax(dim=-1, keepdim=True)
    exponent = torch.ceil(torch.maximum(torch.log2(block_amax / E2M1_MAX), torch.tensor(-127.0)))
    quotient = blocks / torch.exp2(exponent)
    codes = e2m1_codes_ties_toward_zero(quotient)
    scale = (exponent + E8M0_BIAS).to(torch.uint8)
    values = e2m1_values(codes & 7) * (1 - 2 * (codes >> 3).float())
    dequantized = (values * torch.exp2(scale.float() - E8M0_BIAS)).flatten(-2).to(x.dtype)
    return MXSteps("modelopt-qtensor", "e2m1", block_amax, scale.squeeze(-1), quotient, codes, dequantized, x.shape[-1])


def mxfp8_qtensor_steps(x: torch.Tensor) -> MXSteps:
    """modelopt's MXFP8QTensor.quantize(x) and dequantize(), step by step (E4M3 elements).

    x: fp32, bf16 or fp16; the last dim is zero-padded to a multiple of 32 (reduce_block_padding).

    Order:
      amax = max|block| in x's dtype;  d = fp32(amax) / 448 (IEEE)
      e = clamp(ceil(log2(d)), -127, 127) where d > 0, else -127   (a NaN block too: NaN > 0 fails)
      byte = e + 127;  q = x * 2**(127 - byte) in fp32 (torch.exp2)
      data = E4M3(clamp(q, +-448))   (nearest even)
    dequantize: fl(fp32(data) * 2**(byte - 127)), then x's dtype.
    """
    check_float_input(x)
    blocks = mx_blocks(x, "modelopt's MXFP8QTensor", pads=True)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    descale = block_amax.float() / E4M3_MAX
    log2_descale = torch.where(descale > 0, torch.log2(descale), torch.tensor(-127.0))
    scale = (torch.clamp(torch.ceil(log2_descale), min=-127, max=127) + E8M0_BIAS).to(torch.uint8)
    quotient = blocks * torch.exp2(E8M0_BIAS - scale.float())
    data = saturating_e4m3(quotient)
    dequantized = unblock(data.float() * torch.exp2(scale.float() - E8M0_BIAS), x.shape[-1]).to(x.dtype)
    return MXSteps("modelopt-qtensor", "e4m3", block_amax.float(), scale.squeeze(-1), quotient, data.view(torch.uint8),
                   dequantized, x.shape[-1])


__all__ = ["fp8_cuda_steps", "fp8_real_steps", "fp8_steps", "mxfp4_qtensor_steps", "mxfp8_qtensor_steps",
           "nvfp4_kernel_steps", "nvfp4_qtensor_steps"]
