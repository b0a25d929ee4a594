"""vLLM's NVFP4 emulation (GPUs without FP4 units), its PyTorch path, from source (not run: vLLM
is not installable here).

Source: vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py,
`ref_nvfp4_quant` and `ref_nvfp4_quant_dequant` (the CPU path; on CUDA a Triton kernel with
approximate divisions runs instead and is not modelled). It quantizes activations by the input
global scale the checkpoint gives (compressed-tensors' input_global_scale, 2688 / amax).
"""

from __future__ import annotations

import torch

from ..numerics.checks import AmaxLike, check_float_input
from ..numerics.fp8 import saturating_e4m3
from ..numerics.nvfp4 import resolve_global_amax
from .common import RCP_6, NVFP4Steps, blocks_of, clamp_e2m1, e2m1_values, encode_global_scale, require_block_multiple
from .compressed_tensors import cast_to_fp4_codes

STACK = "vLLM NVFP4 emulation"
# get_reciprocal(t) = 1 / (t + (t == 0) * 1e8): a zero is replaced by 1e8 before the division.
ZERO_GUARD = 1e8


def _guarded_reciprocal(t: torch.Tensor) -> torch.Tensor:
    return 1.0 / (t + (t == 0) * ZERO_GUARD)


def nvfp4_steps(x: torch.Tensor, global_amax: AmaxLike = None) -> NVFP4Steps:
    """ref_nvfp4_quant_dequant(x, global_scale = 2688 / amax) on CPU.

    Order:
      G = 2688 / amax (fp32, IEEE: the checkpoint's encode scale)
      e = E4M3(clamp(fl(G * fl(max|block| * fl(1/6))), +-448))
      s = 1 / (fl(fp32(e) * (1 / G)) + (... == 0) * 1e8)       (IEEE)
      q = clamp(fl(fp32(x) * s), +-6), cast_to_fp4 (thresholds, sign by torch.sign)
    dequantize: fl(value * fl(fp32(e) / G)) in x's dtype.
    """
    check_float_input(x)
    require_block_multiple(x, STACK)
    encode = encode_global_scale(resolve_global_amax(x, global_amax).float())
    blocks = blocks_of(x)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    # FLOAT4_E2M1_MAX_RECIPROCAL = 1 / 6 in Python, rounded to fp32 (RCP_6) where a CPU multiply takes it.
    block_scale = saturating_e4m3(encode * (block_amax * RCP_6))
    output_scale = _guarded_reciprocal(block_scale.float() * _guarded_reciprocal(encode))
    quotient = blocks * output_scale
    codes = cast_to_fp4_codes(clamp_e2m1(quotient))
    values = torch.where(torch.isnan(quotient), quotient, e2m1_values(codes, negative_zero=True))
    dequantized = (values * (block_scale.float() / encode)).flatten(-2).to(x.dtype)
    return NVFP4Steps("vllm-emulation", encode, True, block_amax, block_scale.squeeze(-1), quotient, codes, dequantized)
