"""What every stack's NVFP4 and FP8 have in common: the step record each dialect fills, blocks, the
E2M1 codes, the encode-convention global scale, and the GPU's approximate reciprocal as the
fast-math kernels use it.

Each dialect composes these pieces in its own stack's order and says which order in its docstrings;
the rounding itself (E2M1 nearest-even, E4M3 saturating: refquant.numerics.fp8.saturating_e4m3) is
refquant.numerics', once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics.formats import (
    E2M1_MAX,
    E2M1_SIGN_BIT,
    FP32_SMALLEST_NORMAL,
    NVFP4_BLOCK_SIZE,
    NVFP4_SCALE_DENOMINATOR,
    e2m1_code_table,
)
from ..numerics.gpu_division import approx_reciprocal_fp32
from ..numerics.nvfp4 import e2m1_magnitude_index, pack_e2m1, resolve_global_amax, to_blocks

__all__ = [
    "FP8Steps",
    "NVFP4Steps",
    "RCP_6",
    "blocks_of",
    "e2m1_codes_nearest_even",
    "e2m1_values",
    "encode_global_scale",
    "rcp_approx_ftz",
    "require_block_multiple",
]

# fl(1/6) (fp32 0x3E2AAAAB): what TransformerEngine's torch.reciprocal(6.0) and vLLM's 1 / 6, taken
# by an fp32 multiply, both are.
RCP_6 = float(torch.reciprocal(torch.tensor(E2M1_MAX)))


@dataclass
class NVFP4Steps:
    """One stack's NVFP4 quantization of a tensor, step by step.

    Block layout: a tensor of shape (..., n) is seen as (..., n / 16, 16) blocks along the last dim.

    dialect:         the dialect's name (refquant.dialects.NVFP4_DIALECTS).
    global_scale:    fp32 0-d, as the stack stores it; `global_scale_encodes` says which way.
    global_scale_encodes: True when the stored global scale multiplies x on the way in
                     (compressed-tensors' and TransformerEngine's 2688 / amax), False when it
                     multiplies the codes on the way out (modelopt's and torchao's amax / 2688).
    block_amax:      fp32 (..., nblocks, 1): the max |x| each block's scale was computed from.
    block_scale:     float8_e4m3fn (..., nblocks): the stored E4M3 block scale.
    quotient:        fp32 (..., nblocks, 16): the value the stack rounds to E2M1 (x times or over
                     its element scale, before any clamp to +-6).
    codes:           uint8 (..., nblocks, 16): the E2M1 codes, bit 3 the sign.
    dequantized:     x's dtype and shape: the stack's own dequantize of these codes and scales (its
                     fake quant, where it has one).
    """

    dialect: str
    global_scale: torch.Tensor
    global_scale_encodes: bool
    block_amax: torch.Tensor
    block_scale: torch.Tensor
    quotient: torch.Tensor
    codes: torch.Tensor
    dequantized: torch.Tensor

    @property
    def packed(self) -> torch.Tensor:
        """uint8 (..., nblocks * 8): two codes a byte, element 2j in the low nibble (every stack here)."""
        return pack_e2m1(self.codes.flatten(-2))


@dataclass
class FP8Steps:
    """One stack's FP8 E4M3 quantization, step by step.

    scale:        the stored dequantization scale (x ~ data * scale), in the dtype the stack keeps it
                  in, 0-d (per tensor) or keep-dims (per channel / row).
    quotient:     fp32, x's shape: the value rounded to E4M3 (before the clamp to +-448).
    data:         float8_e4m3fn, x's shape.
    dequantized:  x's dtype: the stack's dequantize of data and scale.
    """

    dialect: str
    scale: torch.Tensor
    quotient: torch.Tensor
    data: torch.Tensor
    dequantized: torch.Tensor


def amax_per_tensor_or_row(x: torch.Tensor, amax, per_row: bool) -> torch.Tensor:
    """max|x| in x's dtype: over the last dim, keep-dims, when `per_row` (then `amax` must be None),
    else the given per-tensor amax or max|x| over the tensor, rounded to x's dtype (FP8 stacks that
    take their scale in the weight's dtype)."""
    if per_row:
        if amax is not None:
            raise ValueError("a per-row (per-channel) scale is taken from the data; drop amax.")
        return x.abs().amax(dim=-1, keepdim=True)
    return resolve_global_amax(x, amax).to(x.dtype)


def require_block_multiple(
    x: torch.Tensor, stack: str, format_name: str = "NVFP4", block: int = NVFP4_BLOCK_SIZE
) -> None:
    """Stacks that do not pad refuse a last dim that is not a multiple of the block; so do we.

    format_name and block: "NVFP4" and 16, or "MX" and 32 (refquant.dialects.mx.mx_blocks)."""
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(
            f"{stack} quantizes {format_name} in blocks of {block} along the last dim and does not pad; x has "
            f"shape {tuple(x.shape)}. Pad the last dim to a multiple of {block} first."
        )


def encode_global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    """fp32 2688 / global_amax (fp32), one IEEE division: the global scale of the stacks that store
    the encode convention and compute it in PyTorch (TransformerEngine's S_enc before its guards,
    TensorRT-LLM's SFScaleVal, vLLM's input global scale)."""
    return torch.full_like(global_amax, NVFP4_SCALE_DENOMINATOR) / global_amax


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """fp32 (..., n / 16, 16) blocks of x (n a multiple of 16, zero-padded otherwise)."""
    return to_blocks(x.float())


def e2m1_codes_nearest_even(quotient: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """E2M1 codes: |quotient| rounded to nearest, ties to the even code, saturating at 6
    (refquant.numerics' rounding), sign bit where `negative` (bool) holds. NaN gets magnitude 7."""
    return e2m1_magnitude_index(quotient.abs()) | (negative.to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor, negative_zero: bool = False) -> torch.Tensor:
    """fp32 value of each code; code 8 decodes to -0.0 when `negative_zero`, else +0.0."""
    table = e2m1_code_table(codes.device)
    if negative_zero:
        table = torch.where(torch.arange(16, device=codes.device) == E2M1_SIGN_BIT, -0.0, table)
    return table[codes.long()]


def rcp_approx_ftz(b: torch.Tensor) -> torch.Tensor:
    """fp32 `rcp.approx.ftz.f32(b)`, the CUDA kernels' reciprocal_approximate_ftz.

    The reciprocal of refquant.numerics.gpu_division (measured on sm_90), with the instruction's
    flushes: a subnormal b counts as 0 (result +-inf) and a result below the normal range is 0.
    """
    b = b.float()
    magnitude = b.abs()
    reciprocal = approx_reciprocal_fp32(torch.where(magnitude < FP32_SMALLEST_NORMAL, torch.ones_like(b), b))
    reciprocal = torch.where(magnitude >= 2.0**126, 0.0 * b.sign(), reciprocal)
    signed_inf = torch.where(torch.signbit(b), float("-inf"), float("inf"))
    return torch.where(magnitude < FP32_SMALLEST_NORMAL, signed_inf, torch.where(torch.isnan(b), b, reciprocal))


def clamp_e2m1(v: torch.Tensor) -> torch.Tensor:
    """v clamped to +-6 (NaN stays NaN), before the E2M1 rounding of the stacks that clamp first."""
    return v.clamp(-E2M1_MAX, E2M1_MAX)
