"""NVFP4 real quantization's per-block step as one Triton kernel (CUDA only), for refquant.compiled.

Why a kernel of our own (issue 6 allows one "only where inductor cannot get there"): through
inductor, the reference's block step is one persistent-reduction kernel that builds each block's
8 packed bytes as an int64 word (a sum over the block, so it fuses with the block max): 0.270 ms
at 8192 x 16384 bf16 on an H100, 0.42 of the bandwidth it could reach. Here each block's even and
odd elements are loaded side by side, so two codes become one byte in registers (no int64 word,
no sum across lanes): 0.217 ms, 0.52. Still short of the 0.80 target; docs/compiled.md lists what
was tried (a reciprocal multiply with an exact fallback for near-ties was slower: 0.31 ms).

It is the same arithmetic as refquant.nvfp4.nvfp4_quantize after the global scale, step for step
(nvfp4_real_block_scale, the IEEE quotient, e2m1_magnitude_index, the sign bit, pack_e2m1), and
tests/test_compiled_parity.py holds it to the reference bit for bit on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from refquant.formats import E2M1_MAX, E4M3_MAX, E4M3_MIN_SUBNORMAL, NVFP4_BLOCK_SIZE

# 128 blocks (2048 elements) a program on Triton's default 4 warps: within 1% of the fastest of
# 64 / 128 / 256 blocks x 2 / 4 / 8 warps on the H100 (0.217 ms at 8192 x 16384).
BLOCKS_PER_PROGRAM = 128


@triton.jit
def _e2m1_index(a):
    """refquant.nvfp4.e2m1_magnitude_index of a = |u| (fp32): the add-and-subtract rounding."""
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    shift = step * 8388608.0  # 2**23
    q = (a + shift) - shift
    q = tl.where(q < 6.0, q, 6.0)  # NaN -> 6
    return tl.where(q <= 2.0, q * 2.0, tl.where(q <= 4.0, q + 2.0, 7.0)).to(tl.uint8)


@triton.jit
def _code_of_quotient(x, u, divisor):
    """The 4-bit code of one element from its quotient u = x / divisor: the index of |u|, and the
    sign bit when u < 0."""
    u = tl.where((x == 0.0) & (divisor == 0.0), 0.0, u)  # all-zero tensor: 0 / 0 -> code 0
    return _e2m1_index(tl.abs(u)) | ((u < 0.0).to(tl.uint8) << 3)


@triton.jit
def _nvfp4_blocks_kernel(
    x_ptr,
    global_scale_ptr,
    packed_ptr,
    block_scale_ptr,
    n_blocks,
    E2M1_MAX_: tl.constexpr,
    E4M3_MAX_: tl.constexpr,
    E4M3_MIN_: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    in_range = (block < n_blocks)[:, None]
    pair = tl.arange(0, 8)
    # Even and odd elements side by side: two codes of one byte end up in the same thread.
    even = block[:, None].to(tl.int64) * 16 + 2 * pair[None, :]
    x_even = tl.load(x_ptr + even, mask=in_range, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + even + 1, mask=in_range, other=0.0).to(tl.float32)
    g = tl.load(global_scale_ptr)

    # Block max |x|, NaN propagating like torch.amax (the hardware max drops NaN).
    a_even = tl.abs(x_even)
    a_odd = tl.abs(x_odd)
    has_nan = tl.max(((a_even != a_even) | (a_odd != a_odd)).to(tl.int32), axis=1)
    block_amax = tl.max(tl.maximum(a_even, a_odd), axis=1)
    block_amax = tl.where(has_nan > 0, float("nan"), block_amax)

    # nvfp4_real_block_scale: bmax / fl(6 g) (IEEE), 0 -> 1, clamped to [2**-9, 448], to E4M3.
    quotient = tl.div_rn(block_amax, g * E2M1_MAX_)
    g_is_zero = (tl.zeros([BLOCKS], tl.float32) + g) == 0.0  # per block, so `&` is elementwise
    zero_block = (quotient == 0.0) | ((block_amax == 0.0) & g_is_zero)
    quotient = tl.where(zero_block, 1.0, quotient)
    quotient = tl.where(quotient < E4M3_MIN_, E4M3_MIN_, quotient)  # comparisons keep NaN, as clamp
    quotient = tl.where(quotient > E4M3_MAX_, E4M3_MAX_, quotient)
    block_scale = quotient.to(tl.float8e4nv)
    divisor = (block_scale.to(tl.float32) * g)[:, None]

    q_even = tl.div_rn(x_even, divisor)  # IEEE, as the reference's `blocks / divisor`
    q_odd = tl.div_rn(x_odd, divisor)
    byte = _code_of_quotient(x_even, q_even, divisor) | (_code_of_quotient(x_odd, q_odd, divisor) << 4)
    tl.store(packed_ptr + block[:, None].to(tl.int64) * 8 + pair[None, :], byte, mask=in_range)
    tl.store(block_scale_ptr + block, block_scale, mask=block < n_blocks)


@triton_op("refquant::nvfp4_quantize_blocks", mutates_args=())
def nvfp4_quantize_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bytes (..., n/2) uint8, block scales (..., n/16) float8_e4m3fn) of a contiguous CUDA
    x whose last dim is a multiple of 16, under an fp32 0-d global scale."""
    n_blocks = x.numel() // NVFP4_BLOCK_SIZE
    packed = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    block_scale = torch.empty((*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=x.device)

    def grid(meta):
        return (triton.cdiv(n_blocks, meta["BLOCKS"]),)

    wrap_triton(_nvfp4_blocks_kernel)[grid](
        x,
        global_scale,
        packed,
        block_scale,
        n_blocks,
        E2M1_MAX_=E2M1_MAX,
        E4M3_MAX_=E4M3_MAX,
        E4M3_MIN_=E4M3_MIN_SUBNORMAL,
        BLOCKS=BLOCKS_PER_PROGRAM,
    )
    return packed, block_scale
