"""TransformerEngine 2.20's NVFP4 and FP8 current scaling, as its PyTorch reference computes them,
every operation in its order.

Sources (transformer_engine 2.20.2, the wheel's files):
- NVFP4: transformer_engine/pytorch/custom_recipes/reference_nvfp4.py, `NVFP4QuantizerRef`
  (`_quantize_blockwise_reference`, `cast_to_fp4x2`), 1x16 blocks (activations) or 16x16 tiles
  (weights, `quant_tile_shape=(16, 16)`); no random Hadamard transform, no 4over6.
- FP8: transformer_engine/pytorch/custom_recipes/reference_current_scaling.py,
  `_scale_from_amax_tensor` and `CurrentScalingQuantizerRef._quantize`.
The reference says it matches the CUDA kernel's default path; the kernel (and the swizzled scale
layout it writes) was not run here.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, check_float_input
from ..numerics.fp8 import saturating_e4m3
from ..numerics.formats import E4M3_MAX, FP32_MAX, NVFP4_BLOCK_SIZE
from ..numerics.nvfp4 import resolve_global_amax
from .common import (
    RCP_6,
    FP8Steps,
    NVFP4Steps,
    blocks_of,
    clamp_e2m1,
    e2m1_codes_nearest_even,
    e2m1_values,
    encode_global_scale,
    require_block_multiple,
)

STACK = "TransformerEngine 2.20"


def nvfp4_global_scales(global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_enc, S_dec): S_enc = min(2688 / amax, fp32 max) (IEEE), 1.0 where that is 0 (amax inf);
    S_dec = 1 / S_enc (IEEE)."""
    encode = torch.minimum(encode_global_scale(global_amax), torch.tensor(FP32_MAX))
    encode = torch.where(encode == 0, torch.ones_like(encode), encode)
    return encode, 1.0 / encode


def tile_amax(blocks: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """max|x| per block (..., nblocks, 1); with tile_rows 16, per 16x16 tile of a 2-D x, every row of
    the tile given the tile's max (TE's 2-D weight blocks)."""
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    if tile_rows == 1:
        return block_amax
    rows = block_amax.shape[0]
    tiles = block_amax.unflatten(0, (rows // tile_rows, tile_rows)).amax(dim=1)
    return tiles.repeat_interleave(tile_rows, dim=0)


def te_codes(clipped: torch.Tensor) -> torch.Tensor:
    """cast_to_fp4x2's codes of values in [-6, 6]: thresholds that are nearest-even on E2M1; a
    negative zero and NaN get code 0, a small negative code 8 (its tests are `x >= 0.0` and `x < -0.0`)."""
    codes = e2m1_codes_nearest_even(clipped, clipped < 0)
    return torch.where(torch.isnan(clipped), torch.zeros_like(codes), codes)


def nvfp4_steps(x: torch.Tensor, global_amax: AmaxLike = None, *, tile_rows: int = 1) -> NVFP4Steps:
    """NVFP4QuantizerRef's row-wise quantization of x (fp32, bf16 or fp16; viewed as 2-D rows).

    global_amax: None takes max|x| (in fp32), as the quantizer does; tile_rows 1 (1x16 blocks) or
    16 (16x16 tiles; x's rows a multiple of 16).

    Order (_quantize_blockwise_reference, pow_2_scales False):
      S_enc, S_dec as nvfp4_global_scales
      e = E4M3(clamp(min(fl(amax_block * fl(S_enc * fl(1/6))), fp32 max), +-448))
      s = min(1 / fl(fp32(e) * S_dec), fp32 max)        (IEEE; a zero e gives fp32 max)
      q = fl(fp32(x) * s), clamped to +-6, coded by te_codes
    The reference has no dequantize; `dequantized` is fl(value * fl(fp32(e) * S_dec)) in x's dtype,
    refquant's reading of the format, with code 8 as -0.0.
    """
    check_float_input(x)
    require_block_multiple(x, STACK)
    if tile_rows not in (1, NVFP4_BLOCK_SIZE):
        raise ValueError(f"{STACK} NVFP4 tiles are 1x16 or 16x16; got tile_rows={tile_rows}.")
    rows = x.reshape(-1, x.shape[-1])
    if tile_rows == NVFP4_BLOCK_SIZE and rows.shape[0] % tile_rows:
        raise ValueError(f"16x16 tiles need a row count that is a multiple of 16; x has {rows.shape[0]} rows. "
                         "Pad the rows first (TE pads with zeros).")
    encode, decode = nvfp4_global_scales(resolve_global_amax(x, global_amax).float())
    blocks = blocks_of(rows)
    block_amax = tile_amax(blocks, tile_rows)
    # RCP_6 = torch.reciprocal(torch.tensor(6.0)), which TE folds into the global scale.
    decode_scale = torch.minimum(block_amax * (encode * RCP_6), torch.tensor(FP32_MAX))
    block_scale = saturating_e4m3(decode_scale)
    element_scale = torch.minimum(1.0 / (block_scale.float() * decode), torch.tensor(FP32_MAX))
    quotient = blocks * element_scale
    codes = te_codes(clamp_e2m1(quotient))
    dequantized = (e2m1_values(codes, negative_zero=True) * (block_scale.float() * decode)).flatten(-2).to(x.dtype)
    lead = x.shape[:-1]
    return NVFP4Steps("transformer-engine", encode, True, block_amax.reshape(*lead, -1, 1),
                      block_scale.reshape(*lead, -1), quotient.reshape(*lead, -1, NVFP4_BLOCK_SIZE),
                      codes.reshape(*lead, -1, NVFP4_BLOCK_SIZE), dequantized.reshape(x.shape))


def fp8_steps(x: torch.Tensor, amax: AmaxLike = None) -> FP8Steps:
    """CurrentScalingQuantizerRef (E4M3, eps 0, no power-of-2 scales), per tensor.

    amax = max|fp32(x)| (or given); scale = 448 / amax (IEEE), +inf -> finfo(x.dtype).max, 1.0 where
    amax is 0; scale_inv = reciprocal(scale) is what is stored; data = E4M3(fl(fp32(x) * scale));
    dequantize: fl(fp32(data) * scale_inv) in x's dtype.
    """
    check_float_input(x)
    amax_fp32 = resolve_global_amax(x, amax).float()
    scale = torch.full_like(amax_fp32, E4M3_MAX) / amax_fp32
    scale = torch.where(scale == float("inf"), torch.finfo(x.dtype).max, scale)
    scale = torch.where(amax_fp32 == 0, torch.ones_like(scale), scale)
    scale_inv = torch.reciprocal(scale)
    quotient = x.float() * scale
    data = saturating_e4m3(quotient)
    return FP8Steps("transformer-engine", scale_inv, quotient, data, (data.float() * scale_inv).to(x.dtype))
