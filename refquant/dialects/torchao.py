"""torchao 0.18's NVFP4 and FP8, PyTorch paths, every operation in torchao's order.

Sources (torchao 0.18.0, the wheel's files):
- NVFP4: torchao/prototype/mx_formats/nvfp4_tensor.py, `per_tensor_amax_to_scale`,
  `nvfp4_quantize` (the PyTorch path of NVFP4Tensor.to_nvfp4, use_triton_kernel=False) and
  `NVFP4Tensor.dequantize`; E2M1 codes by torchao/prototype/custom_fp_utils.py
  `_f32_to_floatx_unpacked`; scale swizzling torchao/prototype/mx_formats/utils.py `to_blocked`.
- FP8: torchao/quantization/quant_primitives.py `_choose_scale_float8`, `_quantize_affine_float8`,
  `_dequantize_affine_float8` (Float8Tensor.from_hp with the "torch" kernel choice).
- MX: torchao/prototype/mx_formats/mx_tensor.py `to_mx` (MXTensor.to_mx with the "torch" cast,
  KernelPreference.EMULATED: eager PyTorch), `_to_mx_rceil` (its eager fallback), `get_fp_scale`,
  `to_dtype` (MXTensor.dequantize); config.py `ScaleCalculationMode`; kernels.py `pack_uint4`.
The MSLK Triton kernels (use_triton_kernel=True, KernelPreference.MSLK), the Triton MXFP8 casts and
RCEIL's PTX instruction under torch.compile are other code and are not modelled here.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, check_float_input
from ..numerics.fp8 import divide_by_constant, saturating_e4m3
from ..numerics.formats import E2M1_MAX, E4M3_MAX, E8M0_BIAS, E8M0_NAN, FP32_SMALLEST_NORMAL, NVFP4_SCALE_DENOMINATOR
from ..numerics.nvfp4 import resolve_global_amax
from .common import (
    FP8Steps,
    amax_per_tensor_or_row,
    NVFP4Steps,
    blocks_of,
    clamp_e2m1,
    e2m1_codes_nearest_even,
    e2m1_values,
    require_block_multiple,
)
from .mx import MXSteps, e8m0_values, mx_blocks, mx_element

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
    per_tensor_scale = nvfp4_global_scale(resolve_global_amax(x, global_amax))
    blocks = blocks_of(x)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = saturating_e4m3((block_amax / E2M1_MAX / per_tensor_scale).clamp(min=E4M3_SMALLEST_NORMAL))
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
    data = saturating_e4m3(quotient)
    return FP8Steps("torchao", scale, quotient, data, (data.float() * scale).to(x.dtype))


# ScaleCalculationMode's values; FLOOR is to_mx's default (the OCP spec's rule).
SCALING_MODES = ("floor", "ceil", "even", "rceil")
# An E8M0 byte torchao's RCEIL gives an infinite amax (0xFE, 2**127).
E8M0_FOR_INF = 0xFE


def mx_scale_from_exponent_bits(block_amax: torch.Tensor, element: str, scaling_mode: str) -> torch.Tensor:
    """to_mx's FLOOR, CEIL and EVEN scales: uint8 E8M0 bytes from the fp32 bits of max|block|.

    FLOOR: the exponent field of amax, less 127 (so a subnormal amax counts as 2**-127), less the
    element's emax. CEIL: one more where amax's mantissa field is not zero. EVEN: amax's mantissa
    first rounded to the element's mantissa bits (half up, by adding half an element ulp to the
    bits), then FLOOR. Clamped to [-127, 128] and biased; NaN amax -> 0xFF.
    """
    fmt = mx_element(element)
    bits = block_amax.view(torch.int32)
    if scaling_mode == "even":
        half_ulp = 1 << (23 - fmt.mantissa_bits - 1)
        bits = (bits + half_ulp) & 0x7F800000
    exponent = ((bits >> 23) & 0xFF) - E8M0_BIAS - fmt.emax
    if scaling_mode == "ceil":
        exponent = exponent + ((bits & 0x7FFFFF) > 0).to(torch.int32)
    scale = (exponent.clamp(-E8M0_BIAS, E8M0_BIAS + 1) + E8M0_BIAS).to(torch.uint8)
    return torch.where(torch.isnan(block_amax), E8M0_NAN, scale)


def mx_steps(x: torch.Tensor, element: str = "e4m3", scaling_mode: str = "floor") -> MXSteps:
    """torchao's MXTensor.to_mx(x, elem_dtype, 32, scaling_mode) ("torch" cast, eager), then
    MXTensor.dequantize().

    x: bf16 or fp32 (to_mx asserts it), last dim a multiple of 32. element: "e4m3", "e5m2" or
    "e2m1" (float4_e2m1fn_x2). scaling_mode: "floor" (default), "ceil", "even" or "rceil".

    Order (to_mx): amax = max|block| in x's dtype, then x and amax to fp32;
      floor / ceil / even: b = mx_scale_from_exponent_bits(amax); s = fp32 with exponent field b
        (b = 0 gives 0.0, clamped to 2**-126: a byte-0 block is divided by 2**-126 but decodes
        as 2**-127); q = x / s (IEEE); FP8 clamps q to +-max;
      rceil (_to_mx_rceil, eager): d = amax / max (IEEE); b = clamp(ceil(log2(d)), -127, 127)
        + 127 (torch.log2), NaN -> 0xFF, inf -> 0xFE; r = 2**(127 - b), but 1.0 for b = 0, d for
        NaN, 2**-127 for 0xFE; q = clamp(x * r, +-max);
      FP8: the cast of q (nearest even); E2M1: _f32_to_floatx_unpacked(q) (nearest even,
      saturating, sign bit kept), packed two a byte.
    dequantize (to_dtype): fp32(element) in x's dtype times 2**(b - 127) in x's dtype (NaN for 0xFF).
    """
    check_float_input(x)
    if x.dtype == torch.float16:
        raise ValueError(f"{STACK} MX takes bfloat16 or float32 (to_mx asserts it); x is float16.")
    fmt = mx_element(element)
    if scaling_mode not in SCALING_MODES:
        raise ValueError(f"{STACK} scaling_mode={scaling_mode!r}; ScaleCalculationMode is one of "
                         f"{', '.join(SCALING_MODES)}.")
    blocks = mx_blocks(x, STACK, pads=False)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True).float()
    data = blocks.float()
    if scaling_mode == "rceil":
        descale = block_amax / fmt.max
        exponent = torch.clamp(torch.ceil(torch.log2(descale)), min=-E8M0_BIAS, max=E8M0_BIAS) + E8M0_BIAS
        scale = torch.where(torch.isnan(descale), E8M0_NAN,
                            torch.where(torch.isinf(descale), E8M0_FOR_INF, exponent.to(torch.uint8)))
        reciprocal = torch.where(scale == E8M0_NAN, descale, torch.where(
            scale == E8M0_FOR_INF, 2.0**-127, torch.where(scale == 0, 1.0, torch.exp2(E8M0_BIAS - scale.float()))))
        quotient = data * reciprocal
    else:
        scale = mx_scale_from_exponent_bits(block_amax, element, scaling_mode)
        divisor = (scale.to(torch.int32) << 23).view(torch.float32).clamp(min=FP32_SMALLEST_NORMAL)
        quotient = data / divisor
    if fmt.dtype is None:
        clamped = quotient if scaling_mode != "rceil" else torch.clamp(quotient, min=-fmt.max, max=fmt.max)
        codes = e2m1_codes(clamped)
    else:
        codes = torch.clamp(quotient, min=-fmt.max, max=fmt.max).to(fmt.dtype).view(torch.uint8)
    decode_scale = e8m0_values(scale).to(x.dtype)
    dequantized = (fmt.decode(codes).to(x.dtype) * decode_scale).flatten(-2)
    return MXSteps(f"torchao-{scaling_mode}", element, block_amax, scale.squeeze(-1), quotient, codes, dequantized,
                   x.shape[-1])
