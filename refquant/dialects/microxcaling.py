"""microxcaling, the OCP MX spec v1.0's reference code: MXFP8 (E4M3, E5M2) and MXFP4 fake
quantization, every operation in its order and in x's own dtype.

Source: github.com/microsoft/microxcaling at commit 7bc41952 (2024-08-19; not on PyPI), the
PyTorch path (custom_cuda off): mx/mx_ops.py `_shared_exponents`, `_reshape_to_blocks`,
`_quantize_mx`; mx/elemwise_ops.py `_quantize_elemwise_core`, `_round_mantissa`; mx/formats.py
`_get_format_params`; with mx/specs.py's defaults (scale_bits 8, shared_exp_method "max",
mx_flush_fp32_subnorms off) and quantize_mx_op's rounding "nearest", as its MX linear layers call
it (round_mx_output).

microxcaling computes in the input's dtype: a bf16 tensor's log2, floors and roundings are bf16
ones, which is where it parts from the spec's exact arithmetic (docs/dialects.md). It has fake
quant only; MXSteps' scale byte and codes are its shared exponent and rounded elements in the OCP
encoding.
"""

from __future__ import annotations

import torch

from ..numerics.checks import check_float_input
from ..numerics.formats import E8M0_BIAS, E8M0_NAN, FP32_SMALLEST_NORMAL
from .mx import MXSteps, mx_blocks, mx_element, unblock

STACK = "microxcaling"
# scale_bits 8: shared exponents are kept in [-127, 127]; one above becomes NaN.
SCALE_EMAX = 2**7 - 1
ROUNDINGS = ("nearest", "even", "floor")


def shared_exponents(block_amax: torch.Tensor, emax: int) -> torch.Tensor:
    """_shared_exponents ("max") then _quantize_mx's offset and clamp, in block_amax's dtype:
    floor(log2(amax)) - emax, a zero amax taken as 2**-126 first; above 127 NaN, below -127 -127.

    torch.log2 in x's dtype: a bf16 amax just below a power of two can give that power's log2
    (bf16 keeps 8 bits of it), and floor then lands one too high.
    """
    zero = (block_amax == 0).to(block_amax.dtype)
    exponent = torch.floor(torch.log2(block_amax + FP32_SMALLEST_NORMAL * zero)) - emax
    exponent = torch.where(exponent > SCALE_EMAX, float("nan"), exponent)
    return torch.where(exponent < -SCALE_EMAX, -SCALE_EMAX, exponent)


def round_mantissa(v: torch.Tensor, rounding: str) -> torch.Tensor:
    """_round_mantissa, in v's dtype. "nearest": sign(v) * floor(|v| + 0.5), ties away from zero
    (the sum is rounded to v's dtype first, so a |v| just under 0.5 can round up: in fp32 only
    0.5 - 2**-25, in bf16 values from about 0.498);
    "even": the same, less 1 where |v| - 0.5 is an even integer (ties to even); "floor": toward 0."""
    magnitude = torch.abs(v)
    if rounding == "nearest":
        return torch.sign(v) * torch.floor(magnitude + 0.5)
    if rounding == "even":
        on_even_tie = ((magnitude - 0.5) % 2 == torch.zeros_like(v)).to(v.dtype)
        return torch.sign(v) * (torch.floor(magnitude + 0.5) - on_even_tie)
    return torch.sign(v) * torch.floor(magnitude)


def quantize_elements(scaled: torch.Tensor, element: str, rounding: str) -> torch.Tensor:
    """_quantize_elemwise_core(saturate_normals=True, allow_denorm=True) in scaled's dtype: each
    value's own exponent floor(log2|v|) (a zero counts as 1; at least the element's smallest normal
    exponent, which gives its subnormals), the mantissa shifted up by the element's mantissa bits,
    rounded, shifted back, clamped to +-max; +-inf kept."""
    fmt = mx_element(element)
    zero = (scaled == 0).to(scaled.dtype)
    own_exponent = torch.floor(torch.log2(torch.abs(scaled) + zero)).clip(min=fmt.min_exponent)
    shifted = scaled / (2**own_exponent) * (2**fmt.mantissa_bits)
    rounded = round_mantissa(shifted, rounding)
    values = rounded / (2**fmt.mantissa_bits) * (2**own_exponent)
    values = torch.clamp(values, min=-fmt.max, max=fmt.max)
    return torch.where(scaled == float("inf"), float("inf"), torch.where(scaled == float("-inf"), float("-inf"), values))


def mx_steps(x: torch.Tensor, element: str = "e4m3", *, axis: int = -1, rounding: str = "nearest") -> MXSteps:
    """quantize_mx_op(x, elem_format, block_size 32, axes=[axis], round=rounding), step by step.

    x: fp32, bf16 or fp16, blocks of 32 along `axis` (zero-padded to a multiple of 32, as
    _reshape_to_blocks pads). element: "e4m3", "e5m2" or "e2m1". rounding: "nearest" (its default),
    "even" or "floor".

    Order, all in x's dtype:
      e = shared_exponents(max|block|, emax)               (floor of log2; NaN for a block with inf
                                                            or NaN, which makes the block NaN)
      q = block / 2**e
      v = quantize_elements(q)                             (the element rounding, saturating)
      dequantized = v * 2**e
    Record: scale = e + 127 (NaN -> 0xFF); codes = v in the element format; block layout is that of
    x.movedim(axis, -1).
    """
    check_float_input(x)
    fmt = mx_element(element)
    if rounding not in ROUNDINGS:
        raise ValueError(f"{STACK} rounds MX elements by one of {', '.join(ROUNDINGS)}; got rounding={rounding!r}.")
    moved = x.movedim(axis, -1)
    blocks = mx_blocks(moved, STACK, pads=True)
    block_amax = torch.abs(blocks).amax(dim=-1, keepdim=True)
    exponent = shared_exponents(block_amax, fmt.emax)
    scaled = blocks / (2**exponent)
    values = quantize_elements(scaled, element, rounding)
    dequantized = unblock(values * (2**exponent), moved.shape[-1]).movedim(-1, axis)
    scale = torch.where(torch.isnan(exponent), E8M0_NAN, exponent.float() + E8M0_BIAS).to(torch.uint8)
    return MXSteps(STACK, element, block_amax.float(), scale.squeeze(-1), scaled.float(), fmt.encode(values),
                   dequantized, moved.shape[-1])


__all__ = ["mx_steps", "quantize_elements", "round_mantissa", "shared_exponents"]
