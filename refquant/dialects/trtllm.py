"""TensorRT-LLM's NVFP4 quantization routine as FlashInfer 0.7.2 ships it, from source (not run: its
kernels need a Blackwell GPU).

Source: flashinfer-python 0.7.2.post1,
flashinfer/data/csrc/nv_internal/tensorrt_llm/kernels/quantization_utils.cuh,
`cvt_warp_fp16_to_fp4` (E4M3 scales, no 4over6). With fast math (the default) both reciprocals are
`rcp.approx.ftz.f32` (reciprocal_approximate_ftz), reproduced by refquant's measured table
(refquant.numerics.gpu_division, measured on sm_90: that Blackwell's rcp.approx gives the same
bits is assumed, not measured). With DISABLE_FP4_QUANT_FAST_MATH the routine computes what
TransformerEngine's reference does (refquant.dialects.transformer_engine), except for a zero
block, whose element scale is 0 here.

The caller passes the global scale SFScaleVal = 2688 / amax (fp32, an IEEE division in PyTorch).
E2M1 conversion is `cvt.rn.satfinite.e2m1x2.f32`: nearest even, saturating; its handling of
-0.0 and NaN is not documented where we could read it, so this dialect gives -0.0 code 8 and NaN
magnitude 6 and marks both as unverified.
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, check_float_input
from ..numerics.fp8 import saturating_e4m3
from ..numerics.formats import E2M1_MAX
from ..numerics.nvfp4 import resolve_global_amax
from .common import (
    NVFP4Steps,
    blocks_of,
    e2m1_codes_nearest_even,
    e2m1_values,
    encode_global_scale,
    rcp_approx_ftz,
    require_block_multiple,
)

STACK = "TensorRT-LLM (FlashInfer 0.7.2)"


def nvfp4_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """cvt_warp_fp16_to_fp4 (fast math) over every block of x (bf16 or fp16 in the kernels; fp32 accepted).

    Order, R = rcp.approx.ftz:
      SF = fl(SFScaleVal * fl(vecMax * R(6)))
      e = E4M3(SF) (satfinite, nearest even)
      outputScale = vecMax != 0 ? R(fl(fp32(e) * R(SFScaleVal))) : 0
      q = fl(fp32(x) * outputScale), E2M1 nearest even, saturating
    `dequantized` is fl(value * fl(fp32(e) / SFScaleVal)) in x's dtype, refquant's reading of the format.
    """
    check_float_input(x)
    require_block_multiple(x, STACK)
    encode = encode_global_scale(resolve_global_amax(x, global_amax).float())  # SFScaleVal
    blocks = blocks_of(x)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = saturating_e4m3(encode * (block_amax * rcp_approx_ftz(torch.tensor(E2M1_MAX))))
    output_scale = rcp_approx_ftz(block_scale.float() * rcp_approx_ftz(encode))
    output_scale = torch.where(block_amax != 0, output_scale, 0.0)
    quotient = blocks * output_scale
    codes = e2m1_codes_nearest_even(quotient, torch.signbit(quotient))
    dequantized = (e2m1_values(codes, negative_zero=True) * (block_scale.float() / encode)).flatten(-2).to(x.dtype)
    return NVFP4Steps("trtllm", encode, True, block_amax, block_scale.squeeze(-1), quotient, codes, dequantized)
