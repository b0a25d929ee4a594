"""NVFP4 fake quantization's per-block step as one Triton kernel (CUDA only), for refquant.compiled.

Why a kernel of our own: on an H200 inductor's kernel for the reference's block step
(refquant.numerics.nvfp4.nvfp4_fake_quant_blocks) ran at 0.73 of a device copy (8192 x 16384 bf16).
The card moves memory 1.4x faster than an H100 with the same SMs, so a kernel that was near the
copy's time there is now limited by its instructions. This one does the same arithmetic in
fewer of them, at 0.98 of a copy there (128 blocks on 4 warps; benchmarks/probes/nvfp4_tiles.py):

- one thread holds a block of 16 whole (bf16 and fp16: two rows of 8, two 16-byte loads; fp32:
  sixteen one-dimensional loads, since Triton spreads a 32-byte row over two threads), so the
  block max is register max operations in x's dtype, not a cross-thread reduction; Triton's tl.max skips NaN and gives NaN only when the
  whole block is NaN, which is what the reference's nan_ignoring_block_max does (it describes
  modelopt's kernel, which uses tl.max too);
- the per-block values (the scale S and R(S), the GPU's reciprocal that
  refquant.numerics.gpu_division's table measures) are computed once a block; an element costs a multiply,
  the E2M1 rounding, a multiply and the sign;
- the products that feed an addition are written as PTX mul.rn.f32: Triton would otherwise be
  free to fuse them into an FMA, which rounds once where the reference rounds twice.

Every step is the reference's, in the reference's order, and the E2M1 rounding adds a power of
two chosen from u's exponent where the reference compares twice (same result; see _e2m1_round).
tests/test_nvfp4_fake_kernel.py holds the kernel to the reference bit for bit on CUDA (every
bf16 pattern, fp16 and fp32, NaN and inf blocks, elements next to every decision point under
every block scale, zero, tiny, huge, inf and NaN global amax). The global scale is computed in the kernel from the amax (amax *
fp32(1/2688), the reference's global_scale_from_amax for modelopt's kernel), so a call with a
given amax is one launch.

One global amax per slice (a stack of expert weights): with PROGRAMS_PER_SLICE > 0 each slice is
that many programs' blocks and a program reads its slice's amax, amax_ptr[program //
PROGRAMS_PER_SLICE]; the rest is the same step, so each slice gets what a launch on it alone gives.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..numerics.formats import (
    E2M1_MAX,
    E4M3_MAX,
    NVFP4_BLOCK_SCALE_FLOOR,
    NVFP4_BLOCK_SIZE,
    NVFP4_GLOBAL_SCALE_FLOOR,
    RCP_2688,
)
from .triton_launch import FakeQuantKernel

# Blocks a program and warps: one block a thread, 128 threads. On the H200 (kernel time, ratio to a
# copy; benchmarks/probes/nvfp4_tiles.py): 0.98 at 8192 x 16384 bf16 and 0.90-0.97 on the 6.7B shape's
# activations and weights, against 0.96 / 0.85-0.94 for 256 blocks on 8 warps and 0.65-0.92 with
# two or more blocks a thread (256 on 4 warps, 512 on 4 or 8, 1024 on 8).
BLOCKS_PER_PROGRAM = 128
NUM_WARPS = 4

_BLOCK = tl.constexpr(NVFP4_BLOCK_SIZE)


@triton.jit
def mul_rn(a, b):
    """fl(a * b), never fused with a following addition (PTX mul.rn.f32)."""
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _approx_reciprocal(b):
    """R(b) for fp32 b: the GPU's own reciprocal, PTX rcp.approx.ftz.f32, the instruction inside
    div.full.f32 (Triton's fp32 `/`, modelopt's kernel's division). It is what the table of
    refquant.numerics.gpu_division measures: r(1.m) for every mantissa, the exponent only shifting
    it, results under 2**-126 flushed, +-inf -> +-0, NaN -> NaN. So for every divisor this kernel
    makes (fl(6 g') and S: +inf, or a normal number whose reciprocal is normal) it equals
    approx_reciprocal_fp32, the reference's form, with no 32 MiB table on the device
    (tests/test_nvfp4_fake_kernel.py compares the two for every mantissa on the GPU at hand)."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _reciprocal_kernel(b_ptr, r_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = i < n
    tl.store(r_ptr + i, _approx_reciprocal(tl.load(b_ptr + i, mask=in_range, other=1.0)), mask=in_range)


def kernel_reciprocal(b: torch.Tensor) -> torch.Tensor:
    """The fake kernel's R(b) of every element of a contiguous fp32 CUDA tensor (for the tests that
    hold it to the reference's table)."""
    r = torch.empty_like(b)
    _reciprocal_kernel[(triton.cdiv(b.numel(), 1024),)](b, r, b.numel(), BLOCK=1024)
    return r


@triton.jit
def _e2m1_round(u):
    """refquant.numerics.nvfp4.e2m1_round_magnitude of u = |x| / S >= 0 (fp32; NaN -> 6).

    The reference adds and subtracts step * 2**23 (step 0.5 below 2, 1 below 4, 2 above), which
    rounds u to a multiple of the step. Here the added number is 2**22 * max(1, 2**floor(log2 u))
    (u's exponent bits, at least 1.0), one integer and, one max and one multiply instead of two
    comparisons and two selects: the same below 8, and from 8 up both results reach 8 or more and
    are capped to 6; NaN and inf make the sum NaN, which the cap turns into 6, as the reference's.
    """
    power_of_two = (u.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    shift = tl.maximum(power_of_two, 1.0) * 4194304.0
    q = (u + shift) - shift
    return tl.where(q < 6.0, q, 6.0)


@triton.jit
def _fake_quant(x, scale, rcp_scale, Y_DTYPE: tl.constexpr):
    """Elements of blocks, with their blocks' scale S and R(S) broadcast to x's shape: |x| / S
    rounded onto E2M1, times S, with the sign of x (`0 - p`: a negative that rounds to zero gives
    +0.0, and NaN gives -6 S)."""
    x = x.to(tl.float32)
    p = _e2m1_round(mul_rn(tl.abs(x), rcp_scale)) * scale
    return tl.where(x >= 0.0, p, 0.0 - p).to(Y_DTYPE)


@triton.jit
def _block_scale(block_max, g, rcp_6g, S_FLOOR: tl.constexpr, E4M3_MAX_: tl.constexpr):
    """The block scale S (nvfp4_fake_block_scale: t = m / fl(6 g'), at most 448, to E4M3, times g';
    the floor's blocks get 1.0) and R(S), from the block max m in fp32."""
    ideal = block_max * rcp_6g
    clamped = tl.where(ideal < E4M3_MAX_, ideal, E4M3_MAX_)
    scale = clamped.to(tl.float8e4nv).to(tl.float32) * g
    scale = tl.where(scale >= S_FLOOR, scale, 1.0)
    return scale, _approx_reciprocal(scale)


@triton.jit
def load_four(ptr, in_range):
    """Elements ptr[0..3] of each block, in x's dtype (four (BLOCKS,) tensors)."""
    return (tl.load(ptr, mask=in_range, other=0.0), tl.load(ptr + 1, mask=in_range, other=0.0),
            tl.load(ptr + 2, mask=in_range, other=0.0), tl.load(ptr + 3, mask=in_range, other=0.0))


@triton.jit
def _abs_max_four(a, b, c, d):
    """max(|a|, |b|, |c|, |d|), skipping NaN as tl.max does (the same maximum operation)."""
    return tl.maximum(tl.maximum(tl.abs(a), tl.abs(b)), tl.maximum(tl.abs(c), tl.abs(d)))


@triton.jit
def _store_four(ptr, a, b, c, d, scale, rcp_scale, in_range):
    y_dtype = ptr.dtype.element_ty
    tl.store(ptr, _fake_quant(a, scale, rcp_scale, y_dtype), mask=in_range)
    tl.store(ptr + 1, _fake_quant(b, scale, rcp_scale, y_dtype), mask=in_range)
    tl.store(ptr + 2, _fake_quant(c, scale, rcp_scale, y_dtype), mask=in_range)
    tl.store(ptr + 3, _fake_quant(d, scale, rcp_scale, y_dtype), mask=in_range)


@triton.jit
def _nvfp4_fake_kernel(
    x_ptr,
    amax_ptr,
    y_ptr,
    n_blocks,
    RCP_2688_: tl.constexpr,
    G_FLOOR: tl.constexpr,
    S_FLOOR: tl.constexpr,
    E2M1_MAX_: tl.constexpr,
    E4M3_MAX_: tl.constexpr,
    BLOCKS: tl.constexpr,
    PROGRAMS_PER_SLICE: tl.constexpr,
):
    program = tl.program_id(0)
    if PROGRAMS_PER_SLICE:  # one global amax per slice: this program's slice's
        amax_ptr = amax_ptr + program // PROGRAMS_PER_SLICE
    # The tensor's values, as refquant.numerics.nvfp4.nvfp4_fake_quant computes them.
    global_scale = tl.load(amax_ptr).to(tl.float32) * RCP_2688_  # any float amax: its .float(), exactly
    g = tl.where(global_scale > 0.0, global_scale, G_FLOOR)
    rcp_6g = _approx_reciprocal(g * E2M1_MAX_)
    block = program * BLOCKS + tl.arange(0, BLOCKS)

    # One thread owns a block, so every per-block value lives in its registers. The block max is
    # taken in x's dtype (exact, and the same order), skipping NaN (tl.max and tl.maximum).
    if x_ptr.dtype.element_ty.primitive_bitwidth == 16:
        # Two rows of 8: 16 bytes each, one vector load a row, and Triton gives a row to one
        # thread at any alignment (scripts/triton_sass.py --kernel fake --unaligned-x).
        first = block[:, None].to(tl.int64) * _BLOCK + tl.arange(0, _BLOCK // 2)[None, :]
        in_range = (block < n_blocks)[:, None]
        low = tl.load(x_ptr + first, mask=in_range, other=0.0)
        high = tl.load(x_ptr + first + _BLOCK // 2, mask=in_range, other=0.0)
        block_max = tl.maximum(tl.max(tl.abs(low), axis=1), tl.max(tl.abs(high), axis=1)).to(tl.float32)
        scale, rcp_scale = _block_scale(block_max, g, rcp_6g, S_FLOOR, E4M3_MAX_)
        y_dtype = y_ptr.dtype.element_ty
        tl.store(y_ptr + first, _fake_quant(low, scale[:, None], rcp_scale[:, None], y_dtype), mask=in_range)
        tl.store(y_ptr + first + _BLOCK // 2, _fake_quant(high, scale[:, None], rcp_scale[:, None], y_dtype), mask=in_range)
    else:
        # fp32: a row of 8 is 32 bytes, which Triton spreads over two threads (shuffles and shared
        # memory, the layouts under which NVFP4 real quant's kernel gave launch-to-launch
        # different codes on an H200). So each element of a block is its own one-dimensional
        # load, and there is no layout to choose.
        in_range = block < n_blocks
        start = block.to(tl.int64) * _BLOCK
        x0, x1, x2, x3 = load_four(x_ptr + start, in_range)
        x4, x5, x6, x7 = load_four(x_ptr + start + 4, in_range)
        x8, x9, x10, x11 = load_four(x_ptr + start + 8, in_range)
        x12, x13, x14, x15 = load_four(x_ptr + start + 12, in_range)
        block_max = tl.maximum(tl.maximum(_abs_max_four(x0, x1, x2, x3), _abs_max_four(x4, x5, x6, x7)),
                               tl.maximum(_abs_max_four(x8, x9, x10, x11), _abs_max_four(x12, x13, x14, x15))).to(tl.float32)
        scale, rcp_scale = _block_scale(block_max, g, rcp_6g, S_FLOOR, E4M3_MAX_)
        _store_four(y_ptr + start, x0, x1, x2, x3, scale, rcp_scale, in_range)
        _store_four(y_ptr + start + 4, x4, x5, x6, x7, scale, rcp_scale, in_range)
        _store_four(y_ptr + start + 8, x8, x9, x10, x11, scale, rcp_scale, in_range)
        _store_four(y_ptr + start + 12, x12, x13, x14, x15, scale, rcp_scale, in_range)


def kernel_constants(programs_per_slice: int = 0) -> dict[str, float | int]:
    """The kernel's constexpr arguments (also used by scripts/triton_sass.py); programs_per_slice >
    0: one amax per slice of that many programs' blocks."""
    return {
        "RCP_2688_": RCP_2688,
        "G_FLOOR": NVFP4_GLOBAL_SCALE_FLOOR,
        "S_FLOOR": NVFP4_BLOCK_SCALE_FLOOR,
        "E2M1_MAX_": E2M1_MAX,
        "E4M3_MAX_": E4M3_MAX,
        "BLOCKS": BLOCKS_PER_PROGRAM,
        "PROGRAMS_PER_SLICE": programs_per_slice,
    }


def _programs(x: torch.Tensor) -> int:
    # ceil division in Python: triton.cdiv is a constexpr_function, microseconds of host time a call
    return -(-(x.numel() // NVFP4_BLOCK_SIZE) // BLOCKS_PER_PROGRAM)


@triton_op("refquant::nvfp4_fake_quant_blocks", mutates_args=())
def nvfp4_fake_quant_blocks(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """refquant.numerics.nvfp4.nvfp4_fake_quant of a contiguous CUDA x whose last dim is a multiple
    of 16, under an fp32 0-d global amax."""
    y = torch.empty_like(x)
    wrap_triton(_nvfp4_fake_kernel)[(_programs(x),)](
        x,
        amax,
        y,
        x.numel() // NVFP4_BLOCK_SIZE,
        **kernel_constants(),
        num_warps=NUM_WARPS,
    )
    return y


@functools.cache
def fake_quant_kernel(programs_per_slice: int = 0) -> FakeQuantKernel:
    """The kernel as a bound launch calls it: params (amax,), a count per block of 16; with
    programs_per_slice > 0, amax holds one value per slice of that many programs' blocks."""
    return FakeQuantKernel.of(_nvfp4_fake_kernel, kernel_constants(programs_per_slice), NUM_WARPS, unit=NVFP4_BLOCK_SIZE,
                              per_program=BLOCKS_PER_PROGRAM)


def nvfp4_fake_quant_blocks_now(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """nvfp4_fake_quant_blocks launched eagerly (refquant.compiled.triton_launch), past the
    dispatcher and any graph, as refquant.compiled.functions.BoundKernelLaunch launches it. The amax
    may be any float dtype of one element on x's device (the kernel reads it as fp32, as the
    reference's .float())."""
    return fake_quant_kernel()(x, (amax,))
