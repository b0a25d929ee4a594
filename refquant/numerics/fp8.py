"""FP8 E4M3 fake and real quantization, bit for bit as modelopt computes it.

Fake quant reproduces modelopt's TensorQuantizer (docs/modelopt_behaviour.md §1); real quant
reproduces FP8QTensor.quantize / dequantize (§2). Every rounding step is written out: we never use
`tensor / python_float` (a true division on CPU, a reciprocal multiply on CUDA) and never cast an
out-of-range fp32 to float8_e4m3fn unclamped (NaN on torch 2.11, saturation on 2.13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import (
    AmaxLike,
    Flavor,
    as_amax_tensor,
    check_channel_amax,
    check_flavor,
    check_float_input,
    reduce_amax,
)
from .formats import E4M3_DTYPE, E4M3_MAX, FP8_AMAX_FLOOR, RCP_448
from .straight_through import straight_through


def saturating_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to E4M3 (nearest, ties to even), saturating to +-448; NaN stays NaN.

    Clamping first makes the cast independent of torch's overflow policy (P5): |v| in (448, 464]
    rounds to 448 anyway, and larger values and +-inf saturate as torch 2.13 does.
    """
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3_DTYPE)


def divide_by_constant(v: torch.Tensor, constant: float) -> torch.Tensor:
    """fp32(v) / constant, correctly rounded to fp32, for constant = 448 or 2688 (odd part 7, 21).

    Written as a float64 division rounded once to fp32, so no backend can approximate it: inductor
    on CUDA rewrites a division by a constant as a multiply by its rounded reciprocal (P6,
    docs/compiled.md), and eager CUDA does the same for `tensor / python_float`; in float64 that
    multiply is within 2**-52 (relative) of the true quotient, while v / (k * 2**e) for odd k that
    is not exactly an fp32 value or midpoint lies at least 2**-25 / k from every fp32 rounding
    boundary. So the final rounding to fp32 gives the IEEE quotient either way
    (tests/test_formats.py checks it over every bf16 pattern and millions of fp32 ones).
    """
    return (v.to(torch.float64) / constant).to(torch.float32)


def ieee_reciprocal(v: torch.Tensor) -> torch.Tensor:
    """1 / v correctly rounded, written as a division: torch 2.11's inductor lowers
    torch.reciprocal as an int32 `1 / v`, which Triton divides approximately even under
    division rounding (docs/compiled.md). Same bits as torch.reciprocal in eager mode."""
    return torch.ones_like(v) / v


def fp8_fake_quant_scales(amax: torch.Tensor, flavor: Flavor = "modelopt-cpu"):
    """(scale, inverse scale) in fp32 from an amax, as modelopt's FP8 fake quant forms them.

    amax <= 2**-24 is replaced by 1.0. "modelopt-cpu": scale = fl(448 * rcp(amax)) (Python's
    `448.0 / tensor` is a reciprocal then a multiply: two roundings). "modelopt-cuda": scale =
    448 / amax, one correctly rounded division (modelopt's CUDA extension). Either way the inverse
    is rcp(scale), never amax / 448.
    """
    amax = amax.float()
    amax = torch.where(amax <= FP8_AMAX_FLOOR, torch.ones_like(amax), amax)
    if flavor == "modelopt-cpu":
        scale = ieee_reciprocal(amax) * E4M3_MAX
    else:
        scale = torch.full_like(amax, E4M3_MAX) / amax
    return scale, ieee_reciprocal(scale)


def fp8_fake_quant(
    x: torch.Tensor,
    amax: AmaxLike = None,
    *,
    axis: int | tuple[int, ...] | None = None,
    flavor: Flavor = "modelopt-cpu",
) -> torch.Tensor:
    """FP8 E4M3 fake quantization (quantize, then dequantize) of x; same shape and dtype out.

    amax: a float or 0-d tensor (per-tensor), a keep-dims tensor (per-channel, e.g. (N, 1) for a
    (N, K) weight, (1, 1, C) for a (B, T, C) activation), or None to take max|x| from the data
    (per-tensor, or per `axis` -- the dims that keep their own amax, as modelopt's `axis`).

    Order of operations (docs/modelopt_behaviour.md §1.3): v = fl(fp32(x) * scale), clamp to +-448,
    round to E4M3, widen, multiply by the inverse scale in fp32, round to x's dtype.
    Gradient: modelopt's straight-through one, the upstream gradient unchanged for x and none for
    amax (refquant.numerics.straight_through).
    """
    check_flavor(flavor)
    check_float_input(x)
    if x.numel() == 0:
        return x.clone()
    if amax is None:
        amax = reduce_amax(x.detach(), axis)  # NaN or inf in x makes every output NaN, as in modelopt
    else:
        if axis is not None:
            raise ValueError("pass either amax or axis (axis is for an amax taken from the data), not both.")
        amax = as_amax_tensor(amax, x)
        check_channel_amax(amax, x)
    scale, inv_scale = fp8_fake_quant_scales(amax, flavor)
    if amax.numel() == 1:
        scale, inv_scale = scale.reshape(()), inv_scale.reshape(())
    return straight_through(fp8_fake_quant_with_scales, x, scale, inv_scale)


def fp8_fake_quant_with_scales(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """fp8_fake_quant's element step under the scales fp8_fake_quant_scales gave (fp32, 0-d or
    broadcasting over x): x * scale onto the E4M3 grid, times the inverse scale, in x's dtype.
    A pure function of the values, without fp8_fake_quant's gradient. (refquant.compiled's bound
    quantizer call, made only outside autograd, computes the scales once and calls this.)"""
    on_grid = saturating_e4m3(x.float() * scale).float()
    return (on_grid * inv_scale).to(x.dtype)


@dataclass
class FP8Tensor:
    """Real-quantized FP8 tensor, as modelopt's FP8QTensor holds it.

    data:  float8_e4m3fn, x's shape.
    scale: the dequantization scale as FP8QTensor returns it: x's dtype when computed from the
           data, fp32 when given or derived from an fp32 amax. 0-d (per-tensor), keep-dims
           (per-channel), or (..., ceil(n / block_size)) for per-block scales.
    dtype: the original dtype, the default of dequantize().
    block_size: None, or the block length along the last dim for per-block scales.
    """

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    block_size: int | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """data * scale, multiplied in the target dtype (one rounding there), as FP8QTensor does."""
        dtype = dtype or self.dtype
        scale = self.scale.to(dtype)
        if self.block_size is not None:
            scale = scale.repeat_interleave(self.block_size, dim=-1)[..., : self.data.shape[-1]]
        return self.data.to(dtype) * scale


def fp8_quantize(
    x: torch.Tensor,
    amax: AmaxLike = None,
    *,
    scale: torch.Tensor | float | None = None,
    axis: int | tuple[int, ...] | None = None,
    block_size: int | None = None,
    flavor: Flavor = "modelopt-cpu",
) -> FP8Tensor:
    """Real FP8 quantization: FP8QTensor.quantize (docs/modelopt_behaviour.md §2.2), or the
    TensorQuantizer path.

    Exactly one source for the scale:
    - `scale`: used as given (FP8QTensor.quantize(x, scales=scale)); a float becomes fp32.
    - `amax`: scale = amax / 448 in amax's dtype (the TensorQuantizer real-quant path,
      `self.amax / 448.0`); a float amax is fp32. Where that scale is 0 (amax 0, a quantizer
      calibration never reached) it is 1.0, the scale of the maxbound 448, as modelopt's export
      gives a zero amax (docs/contract.md §5); modelopt's real-quant path divides by 0 there.
    - neither: amax = max|x| in x's dtype (per-tensor, per `axis`, or per block of `block_size`
      along the last dim) and scale = amax / 448 in x's dtype.
    "modelopt-cpu" divides by 448 exactly; "modelopt-cuda" multiplies by fp32(1/448), and rounds
    a given 0-d fp32 scale to x's dtype before dividing a bf16/fp16 x (what torch's CUDA kernel does).

    The quotient x / scale is formed in fp32 and rounded to the promoted dtype of (x, scale) before
    the E4M3 rounding (two roundings for bf16/fp16 x, as modelopt). modelopt does not clamp; we
    saturate to +-448 explicitly (torch 2.13's behaviour, which the vectors record).
    """
    check_flavor(flavor)
    check_float_input(x)
    if x.numel() == 0:
        raise ValueError(f"x of shape {tuple(x.shape)} is empty: there is nothing to quantize.")
    sources = sum(v is not None for v in (amax, scale))
    if sources > 1:
        raise ValueError("pass at most one of amax and scale.")
    if (axis is not None or block_size is not None) and sources:
        raise ValueError("axis and block_size choose how the scale is computed from x; drop them when passing amax or scale.")
    if axis is not None and block_size is not None:
        raise ValueError("pass either axis (per-channel) or block_size (per-block), not both.")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}.")

    x_blocked = x
    if scale is not None:
        scale = as_amax_tensor(scale, x, what="scale", positive=True)
        check_channel_amax(scale, x, what="scale")
    elif amax is not None:
        amax = as_amax_tensor(amax, x)
        check_channel_amax(amax, x)
        scale = _scale_of_given_amax(amax, flavor)
    elif block_size is not None:
        x_blocked = _pad_last_dim(x, block_size)
        blocks = x_blocked.unflatten(-1, (-1, block_size))
        scale = divide_by_448(blocks.abs().amax(dim=-1), flavor)
    else:
        scale = divide_by_448(reduce_amax(x, axis), flavor)

    divisor = scale
    if block_size is not None:
        divisor = scale.repeat_interleave(block_size, dim=-1)
    elif flavor == "modelopt-cuda" and scale.ndim == 0 and x.dtype != scale.dtype:
        divisor = scale.to(x.dtype)
    quotient_dtype = _quotient_dtype(x_blocked, divisor)
    quotient = (x_blocked.float() / divisor.float()).to(quotient_dtype)
    # Deviation (docs/contract.md §5): a zero amax (an all-zero tensor, channel or block) gives a
    # zero scale, and modelopt's 0 / 0 makes NaN bytes; we give zeros, which dequantize to zeros.
    quotient = torch.where((x_blocked == 0) & (divisor == 0), torch.zeros_like(quotient), quotient)
    data = saturating_e4m3(quotient)[..., : x.shape[-1]] if x.ndim else saturating_e4m3(quotient)
    return FP8Tensor(data=data, scale=scale, dtype=x.dtype, block_size=block_size)


def _quotient_dtype(x: torch.Tensor, divisor: torch.Tensor) -> torch.dtype:
    """torch.result_type(x, divisor) for floating x and divisor, spelled out (dynamo can trace it).

    A 0-d divisor does not widen a dimensioned x (torch's promotion of "scalar" tensors), so a
    bf16 x over an fp32 0-d scale gives bf16, as modelopt's `x / scale` does.
    """
    if divisor.ndim == 0 and x.ndim > 0:
        return x.dtype
    if x.ndim == 0 and divisor.ndim > 0:
        return divisor.dtype
    return torch.promote_types(x.dtype, divisor.dtype)


def _scale_of_given_amax(amax: torch.Tensor, flavor: Flavor) -> torch.Tensor:
    """amax / 448 in amax's dtype, and 1.0 (448 / 448) where that is 0: amax 0, or an amax too
    small for its dtype to hold amax / 448 (fp16 below about 448 * 2**-25). modelopt's export maps
    a zero amax to the maxbound 448 so that a checkpoint's scale stays positive
    (TensorQuantizer.export_amax, refquant.hf.export's _export_amax); a zero scale would turn
    every nonzero element into x / 0, saturated bytes that dequantize to 0."""
    scale = divide_by_448(amax, flavor)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def divide_by_448(amax: torch.Tensor, flavor: Flavor) -> torch.Tensor:
    """amax / 448.0 in amax's dtype, computed in fp32 and rounded once, per flavor (P2)."""
    if flavor == "modelopt-cpu":
        quotient = divide_by_constant(amax.float(), E4M3_MAX)
    else:
        quotient = amax.float() * RCP_448
    return quotient.to(amax.dtype)


def _pad_last_dim(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x
