"""compressed-tensors 0.19 / 0.20 NVFP4 and FP8 as llm-compressor 0.14 calibrates them, every
operation in their order (CPU, eager: the paths their reference code takes without Triton).

Sources (the wheels' files):
- global scale: compressed_tensors/quantization/utils/helpers.py `generate_gparam`, called by
  llmcompressor/observers/base.py `Observer.get_global_scale` on the observer's min/max, which
  llmcompressor/observers/min_max.py takes in the weight's dtype;
- block / channel scales: helpers.py `calculate_qparams` (then stored in a parameter of the
  weight's dtype, compressed_tensors/quantization/lifecycle/initialize.py);
- elements: compressed_tensors/quantization/lifecycle/forward_helpers.py `_quantize` and
  `_quantize_dequantize` (fake quant), quant_args.py `round_to_quantized_type_args`,
  quantization/utils/fp4_utils.py `cast_to_fp4`, compressors/nvfp4/helpers.py `pack_fp4_to_uint8`.
Shared global scales (llm-compressor fuses q/k/v and gate/up): `fused_global_amax`.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, check_float_input
from ..numerics.fp8 import saturating_e4m3
from ..numerics.formats import E2M1_MAX, E4M3_MAX, NVFP4_SCALE_DENOMINATOR
from ..numerics.nvfp4 import resolve_global_amax
from .common import (
    FP8Steps,
    NVFP4Steps,
    amax_per_tensor_or_row,
    blocks_of,
    clamp_e2m1,
    e2m1_codes_nearest_even,
    e2m1_values,
    require_block_multiple,
)

STACK = "compressed-tensors 0.19"
# _get_dtype_eps: a zero E4M3 block scale is replaced by 0.125; an FP8 scale in x's dtype by its eps.
ZERO_BLOCK_SCALE = 0.125


def nvfp4_global_scale(global_amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """generate_gparam on an amax held in `dtype` (the weight's): fp32 [1] -> 0-d here.

    amax is clamped below at finfo(dtype).tiny; `2688.0 / amax` is Python's reflected division,
    reciprocal(amax) * 2688, each rounded to `dtype` (bf16: twice); NaN and +-inf become 1.0; then fp32.
    """
    amax = global_amax.to(dtype).clamp(min=torch.finfo(dtype).tiny)
    global_scale = torch.reciprocal(amax) * NVFP4_SCALE_DENOMINATOR
    return torch.nan_to_num(global_scale, nan=1.0, posinf=1.0, neginf=1.0).float()


def fused_global_amax(*amaxes: torch.Tensor) -> torch.Tensor:
    """The one global amax llm-compressor gives fused layers (q/k/v, gate/up): the max of theirs."""
    return torch.stack([a.reshape(()) for a in amaxes]).amax()


def nvfp4_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """calculate_qparams for TENSOR_GROUP: fp32 E4M3-valued block scales, (..., nblocks, 1).

    max|block| in `dtype` over 6 (a `dtype` division), times the fp32 global scale, clamped to
    +-448 and cast to E4M3 and back; a zero becomes 0.125.
    """
    local = block_amax.to(dtype) / torch.tensor(E2M1_MAX, dtype=dtype)
    # compressed-tensors' global scale has shape [1], so the product is promoted to fp32.
    scale = saturating_e4m3(global_scale * local.float()).float()
    return torch.where(scale == 0, ZERO_BLOCK_SCALE, scale)


def cast_to_fp4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """cast_to_fp4 then pack_fp4_to_uint8's code of each value.

    cast_to_fp4 rounds |v| by thresholds that are nearest-even on E2M1 (0.25 -> 0, 0.75 -> 1,
    1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4) and multiplies by torch.sign(v), so a value
    that rounds to zero keeps its sign only if it was nonzero (-0.0 gives +0.0, -0.1 gives -0.0),
    and a NaN stays NaN; the packer takes the sign bit of that value and maps NaN to magnitude 0.
    """
    sign = torch.sign(scaled)
    rounded = e2m1_codes_nearest_even(scaled, torch.zeros_like(scaled, dtype=torch.bool))
    value_negative = torch.signbit(torch.where(torch.isnan(scaled), scaled * sign, e2m1_values(rounded) * sign))
    magnitude = torch.where(torch.isnan(scaled), torch.zeros_like(rounded), rounded)
    return magnitude | (value_negative.to(torch.uint8) << 3)


def nvfp4_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """llm-compressor's NVFP4 weight calibration, compressed-tensors' compression and fake quant.

    x: the weight (fp32, bf16 or fp16; its dtype is the observer's), last dim a multiple of 16.
    global_amax: the amax the observer saw (a fused group's max, fused_global_amax); None: max|x|.

    Order:
      G = reciprocal(amax) * 2688 in x's dtype, then fp32        (generate_gparam; stored as
                                                                   weight_global_scale)
      e = E4M3(clamp(fl(G * (max|block| / 6 in x's dtype)), +-448)); 0 -> 0.125   (calculate_qparams)
      s = fp32(e) / G                                              (IEEE; `scale / global_scale`)
      q = fp32(x) / s                                              (IEEE)
      codes = cast_to_fp4(clamp(q, -6, 6)) packed (cast_to_fp4_codes)
    fake quant (_quantize_dequantize): fl(value * s) rounded to x's dtype, a zero keeping the sign
    cast_to_fp4 gave it.
    """
    check_float_input(x)
    require_block_multiple(x, STACK)
    global_scale = nvfp4_global_scale(resolve_global_amax(x, global_amax), x.dtype)
    blocks = blocks_of(x)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = nvfp4_block_scale(block_amax, global_scale, x.dtype)
    element_scale = block_scale / global_scale
    quotient = blocks / element_scale
    codes = cast_to_fp4_codes(clamp_e2m1(quotient))
    values = torch.where(torch.isnan(quotient), quotient, e2m1_values(codes, negative_zero=True))
    dequantized = (values * element_scale).flatten(-2).to(x.dtype)
    return NVFP4Steps("compressed-tensors", global_scale, True, block_amax, block_scale.to(torch.float8_e4m3fn).squeeze(-1),
                      quotient, codes, dequantized)


def fp8_steps(x: torch.Tensor, amax: AmaxLike = None, *, per_channel: bool = False) -> FP8Steps:
    """llm-compressor's FP8 weight calibration (per tensor, or per output channel: a max over the
    last dim) and compressed-tensors' quantize / fake quant.

    scale = max|x| / 448 in x's dtype (a 0-d `dtype` divisor), 0 -> finfo(dtype).eps;
    q = x / scale in x's dtype (bf16: rounded to bf16 before the E4M3 rounding), clamped to +-448,
    cast to E4M3; fake quant: fl(value * scale) in x's dtype.
    """
    check_float_input(x)
    amax_in_dtype = amax_per_tensor_or_row(x, amax, per_channel)
    scale = amax_in_dtype / torch.tensor(E4M3_MAX, dtype=x.dtype)
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    quotient = x / scale
    data = saturating_e4m3(quotient.float())
    return FP8Steps("compressed-tensors", scale, quotient.float(), data, (data.to(x.dtype) * scale))
