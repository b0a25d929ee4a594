"""torchao 0.18's NVFP4 and FP8, PyTorch paths, every operation in torchao's order.

Sources (torchao 0.18.0, the wheel's files):
- NVFP4: torchao/prototype/mx_formats/nvfp4_tensor.py, `per_tensor_amax_to_scale`,
  `nvfp4_quantize` (the PyTorch path of NVFP4Tensor.to_nvfp4, use_triton_kernel=False) and
  `NVFP4Tensor.dequantize`; E2M1 codes by torchao/prototype/custom_fp_utils.py
  `_f32_to_floatx_unpacked`; scale swizzling torchao/prototype/mx_formats/utils.py `to_blocked`.
- FP8: torchao/quantization/quant_primitives.py `_choose_scale_float8`, `_quantize_affine_float8`,
  `_dequantize_affine_float8` (Float8Tensor.from_hp with the "torch" kernel choice).
The MSLK Triton kernels (use_triton_kernel=True, KernelPreference.MSLK) are other code and are not
modelled here.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, check_float_input
from ..numerics.fp8 import divide_by_constant
from ..numerics.formats import E2M1_MAX, E4M3_MAX, NVFP4_SCALE_DENOMINATOR
from ..numerics.nvfp4 import _global_amax
from .common import (
    FP8Steps,
    amax_per_tensor_or_row,
    NVFP4Steps,
    blocks_of,
    clamp_e2m1,
    e2m1_codes_nearest_even,
    e2m1_values,
    e4m3_round,
    require_block_multiple,
)

STACK = "torchao 0.18"
# torch.finfo(torch.float8_e4m3fn).tiny: torchao clamps block scales below at the smallest normal E4M3.
E4M3_SMALLEST_NORMAL = 2.0**-6


def nvfp4_global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    """per_tensor_amax_to_scale: fp32(amax) / 2688, one IEEE fp32 division (on CPU)."""
    return divide_by_constant(global_amax.float(), NVFP4_SCALE_DENOMINATOR)


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """_f32_to_floatx_unpacked(scaled, 2, 1): nearest-even E2M1 of |scaled| (saturating), the sign
    bit copied from scaled's own (so -0.0 gets code 8).

    A NaN takes the integer path of a normal number: its bits, less 126 in the exponent, plus the
    rounding bias, shifted down 22 and kept to 8 bits, which gives magnitude 2, 3 or 4 by payload.
    """
    bits = scaled.view(torch.int32)
    negative = bits < 0
    codes = e2m1_codes_nearest_even(scaled, negative)
    magnitude_bits = bits & 0x7FFFFFFF
    odd = (magnitude_bits >> 22) & 1
    nan_index = ((magnitude_bits + ((1 - 127) << 23) + (1 << 21) - 1 + odd) >> 22) & 0xFF
    nan_codes = nan_index.to(torch.uint8) | (negative.to(torch.uint8) << 3)
    return torch.where(torch.isnan(scaled), nan_codes, codes)


def nvfp4_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """torchao's NVFP4 quantization with a per-tensor scale, then NVFP4Tensor.dequantize.

    x: fp32 or bf16 (torchao's assertion; fp16 is refused there and here), last dim a multiple of 16.
    global_amax: the calibrated amax (float or 0-d); None takes max|x|.

    Order (nvfp4_quantize, per_tensor_scale given):
      pts = amax / 2688                                  (fp32, IEEE)
      b = max|block| / 6.0                               (fp32, IEEE)
      e = E4M3(clamp(b / pts, 2**-6, 448))               (IEEE division; the clamp floor is the
                                                          smallest normal E4M3, so a zero block gets 2**-6)
      r = (1.0 / pts) / fp32(e)                          (two IEEE divisions)
      q = clamp(x * r, -6, 6), rounded to E2M1 nearest even, sign bit of q kept (-0.0 -> code 8)
    dequantize: fl(value(code) * fl(pts * fp32(e))) rounded to x's dtype; code 8 is -0.0.
    """
    check_float_input(x)
    if x.dtype == torch.float16:
        raise ValueError(f"{STACK} NVFP4 takes bfloat16 or float32 (nvfp4_quantize asserts it); x is float16.")
    require_block_multiple(x, STACK)
    per_tensor_scale = nvfp4_global_scale(_global_amax(x, global_amax))
    blocks = blocks_of(x)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = e4m3_round((block_amax / E2M1_MAX / per_tensor_scale).clamp(min=E4M3_SMALLEST_NORMAL))
    reciprocal_scale = (1.0 / per_tensor_scale) / block_scale.float()
    quotient = blocks * reciprocal_scale
    codes = e2m1_codes(clamp_e2m1(quotient))
    decode_scale = per_tensor_scale * block_scale.float()
    dequantized = (e2m1_values(codes, negative_zero=True) * decode_scale).flatten(-2).to(x.dtype)
    return NVFP4Steps("torchao", per_tensor_scale, False, block_amax, block_scale.squeeze(-1), quotient, codes,
                      dequantized)


def fp8_steps(x: torch.Tensor, amax: AmaxLike = None, *, per_row: bool = False) -> FP8Steps:
    """torchao's Float8Tensor.from_hp ("torch" kernel), then dequantize.

    scale = max|x| / 448 computed in x's dtype (an fp32 quotient rounded to x's dtype), then fp32;
    per tensor, or per row (max over the last dim) with `per_row`. A given `amax` (per-tensor) is
    taken in x's dtype the same way. data = E4M3(clamp(fp32(x) / scale, +-448)) (IEEE division; a
    zero scale gives NaN, as in torchao); dequantize: fl(fp32(data) * scale) rounded to x's dtype.
    """
    check_float_input(x)
    amax_in_dtype = amax_per_tensor_or_row(x, amax, per_row)
    scale = divide_by_constant(amax_in_dtype.float(), E4M3_MAX).to(x.dtype).float()
    quotient = x.float() / scale
    data = e4m3_round(quotient)
    return FP8Steps("torchao", scale, quotient, data, (data.float() * scale).to(x.dtype))
