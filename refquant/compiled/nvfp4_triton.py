"""NVFP4 real quantization's per-block step as one Triton kernel (CUDA only), for refquant.compiled.

Why a kernel of our own (the math has one source, so a kernel is written only where inductor
cannot get there): through inductor, the reference's block step
(refquant.numerics.nvfp4.nvfp4_quantize_blocks) is one persistent-reduction kernel at 0.270 ms
for 8192 x 16384 bf16 on an H100, 0.42 of the bandwidth it could reach, and compute-bound: an IEEE
division an element (a branchy instruction sequence with a slow-path call) and the E2M1 rounding
of the quotient, about 50 instructions an element. A Triton
kernel doing that same arithmetic ran at 0.217 ms. This one ran at 0.118 ms (0.97) there. The
H200 moves memory 1.4x faster with the same SMs, and there the kernel was bound by its integer and
logic instructions (0.73 of the copy's bandwidth); with the bf16 path's element step moved to the
FMA pipe (the ladder below) it runs at 0.95-0.97 of the copy's bandwidth on the H200
(scripts/triton_sass.py counts the instructions; docs/compiled.md has the design).

The element step here does not divide. Within a block the divisor d = fp32(block scale) * g is
fixed, and the reference's code is a monotone function of |x| (plus the sign), so it is decided
by comparing |x| with eight per-block thresholds, each the exact inverse image of one E2M1
decision point under the IEEE quotient:

- the E2M1 index is >= k iff RN(|x| / d) passes decision point b (> b where a tie rounds down,
  >= b where it rounds up: formats.E2M1_TIE_ROUNDS_UP). RN(z) > b iff z > b + h, and RN(z) >= b
  iff z >= b - h, with h half an ulp of b (b's fp32 mantissa is even, so the midpoint's tie goes
  to b). Over the reals, |x| / d > b + h iff |x| > (b + h) d iff |x| > RD((b + h) d), because no
  fp32 lies strictly between RD(y) and y; likewise |x| >= (b - h) d iff |x| >= RU((b - h) d).
  (b +- h) d = b d +- h d is one FMA, so RD / RU of it is one FMA in that rounding mode
  (fma.rm / fma.rp, exact before its single rounding), and h d is exact (h is a power of two);
- the sign bit is set iff RN(x / d) < 0, i.e. x < 0 and RN(|x| / d) != 0, i.e. |x| / d > 2**-150,
  i.e. |x| > RD(d * 2**-150), computed as RD(RD(d * 2**-64) * 2**-86) (the second rounding's grid
  scaled up by 2**86 lies in the first one's, so the two roundings equal one).

The fp32 path makes the seven index comparisons three (a binary search over the thresholds,
which keeps NaN: a NaN |x| passes every `not <` and gets index 7, as in the reference); the bf16
path sums all seven (below). NaN blocks get a NaN divisor, NaN thresholds, index 7 and no sign
bit, as in the reference. The argument needs h d and the thresholds to be normal numbers and
nothing to overflow, which holds for every block when 2**-90 <= g <= 2**100. Any other global
scale (zero, inf, NaN, a tiny given amax) takes the division path, which is the reference's
arithmetic step for step.

Three paths, one kernel (the global scale is read on the device, so the choice is made there):
- bf16 (the common case; x 16-byte aligned, as a tensor at the start of its storage is): x is
  read as words of two bf16, and the thresholds are rounded onto bf16 (for bf16 |x|,
  |x| >= t iff |x| >= RU_bf16(t), |x| > t iff |x| > RD_bf16(t)), so each instruction handles
  two elements. The code is a ladder (_PAIR_CODES_PTX): seven bf16x2
  comparisons with the thresholds and one of x with -t0 for the sign bit (x < -t0 is x < 0 and
  |x| > t0, false for NaN and -0.0), each summed into a bf16 count by an FMA, then two PRMT and
  one LEA.HI a pair of words for the bytes. On the H200 the binary search this replaced was
  bound by the ALU pipe (LOP3 selects and bit masks; that pipe takes a warp's instruction every
  other cycle); the ladder is bf16x2 arithmetic (a block's loop: 237 instructions, of which 64
  HSET2, 72 HFMA2 and 48 integer, logic and fp32-compare instructions; the binary search's: 218,
  of which 32 HSET2 and 124 integer and logic; scripts/triton_sass.py). One thread owns a whole
  block (no shuffles). The grid is persistent, and each program loads its next tile before
  working on this one;
- fp16, fp32 and bf16 not 16-byte aligned: the thresholds in fp32, one element at a time, each
  element of a block its own one-dimensional load, so that whatever x's alignment one thread
  owns a block (_any_dtype_tile says why). On the H200 at 8192 x 16384: fp16 0.175 ms, fp32
  0.273 ms (0.94 of its copy), bf16 8 bytes off alignment 0.223 ms, against 0.095 ms for the
  bf16 path (do_bench);
- a global scale outside the window: the division.
The block scale is the reference's nvfp4_real_block_scale (one IEEE division a block). The block
max is an integer max of the magnitude bits (NaN patterns sort above inf), so NaN propagates as
in torch.amax. The global scale is computed in the kernel when the call passes the global amax
(nvfp4_quantize_from_amax, what refquant.compiled.nvfp4_quantize uses), so a call with a given
amax is one launch. tests/test_compiled_parity.py holds every path to the reference bit for bit
on CUDA, including fp32 and bf16 inputs on and next to every threshold.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..numerics.formats import (
    E2M1_DECISION_POINTS,
    E2M1_MAX,
    E2M1_TIE_ROUNDS_UP,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    NVFP4_BLOCK_SIZE,
    NVFP4_SCALE_DENOMINATOR,
    RCP_2688,
)
from .nvfp4_fake_triton import load_four  # elements ptr[0..3] of each block, in x's dtype
from .triton_launch import DirectLaunch, starts_aligned

# A tile of 128 blocks on 4 warps (one block a thread), 8 persistent programs an SM. The bf16
# path needs 56 registers a thread (scripts/triton_sass.py), so up to 9 such programs fit an SM at
# once; with more, the rest wait for a second wave (0.79-0.83 at 10 and 12). On the H200 (kernel
# time over a copy's bandwidth, 8192 x 16384 / 11008 x 4096 bf16; benchmarks/probes/nvfp4_tiles.py
# --real): 0.957-0.967 / 0.923-0.941 at 8 an SM, 0.961-0.970 / 0.918-0.948 at 9,
# 0.958 / 0.918 at 7; 256 blocks on 8 warps at 4 or 5 an SM 0.914-0.923 / 0.858-0.885; 512
# blocks on 8 warps (87 registers) 0.78-0.82; one program a tile 0.75-0.77.
BLOCKS_PER_PROGRAM = 128
NUM_WARPS = 4
PROGRAMS_PER_SM = 8
# What the kernel's scale_source_ptr holds: the global scale, or the global amax, from which the
# kernel computes the global scale as the reference does for each flavor (one launch a call).
GIVEN_GLOBAL_SCALE, FROM_AMAX_TIMES_RCP_2688, FROM_AMAX_OVER_2688 = 0, 1, 2
_GIVEN_GLOBAL_SCALE = tl.constexpr(GIVEN_GLOBAL_SCALE)
_FROM_AMAX_TIMES_RCP_2688 = tl.constexpr(FROM_AMAX_TIMES_RCP_2688)
_FROM_AMAX_OVER_2688 = tl.constexpr(FROM_AMAX_OVER_2688)
# fp16, fp32, and a global scale outside the window: 128 blocks a tile.
ANY_DTYPE_BLOCKS_PER_PROGRAM = 128

# The threshold path's window for the global scale (see the module docstring).
THRESHOLD_PATH_MIN_GLOBAL_SCALE = 2.0**-90
THRESHOLD_PATH_MAX_GLOBAL_SCALE = 2.0**100

# The kernel compares with ">=" at the decision points whose ties round up (0.75, 1.75, 3.5) and
# ">" at the others (the fp32 path's binary search, the bf16 path's ladder): it is written for this
# pattern.
if E2M1_TIE_ROUNDS_UP != (False, True, False, True, False, True, False):
    raise RuntimeError("refquant.compiled.nvfp4_triton assumes E2M1 ties round down, up, down, ... at its 7 decision points.")


def _half_ulp(b: float) -> float:
    """Half an fp32 ulp of b > 0 (b's binade [2**e, 2**(e+1)) has ulp 2**(e - 23))."""
    return math.ldexp(1.0, math.frexp(b)[1] - 1 - 24)


_BLOCK = tl.constexpr(NVFP4_BLOCK_SIZE)
_B1, _B2, _B3, _B4, _B5, _B6, _B7 = (tl.constexpr(b) for b in E2M1_DECISION_POINTS)
_H1, _H2, _H3, _H4, _H5, _H6, _H7 = (tl.constexpr(_half_ulp(b)) for b in E2M1_DECISION_POINTS)


@triton.jit
def _e2m1_index(a):
    """refquant.numerics.nvfp4.e2m1_magnitude_index of a = |u| (fp32): the add-and-subtract rounding."""
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    shift = step * 8388608.0  # 2**23
    q = (a + shift) - shift
    q = tl.where(q < 6.0, q, 6.0)  # NaN -> 6
    return tl.where(q <= 2.0, q * 2.0, tl.where(q <= 4.0, q + 2.0, 7.0)).to(tl.int32)


@triton.jit
def _codes_by_division(x, divisor):
    """The reference's element step: u = x / divisor (IEEE), the E2M1 index of |u|, the sign bit
    when u < 0; 0 / 0 (an all-zero tensor) gives code 0."""
    u = tl.div_rn(x, divisor)
    u = tl.where((x == 0.0) & (divisor == 0.0), 0.0, u)
    return _e2m1_index(tl.abs(u)) | ((u < 0.0).to(tl.int32) << 3)


@triton.jit
def _fma_rd(a, b, c):
    """fl(a * b + c) rounded toward -inf (PTX fma.rm.f32: no flush to zero, unlike libdevice's)."""
    return tl.inline_asm_elementwise("fma.rm.f32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fma_ru(a, b, c):
    """fl(a * b + c) rounded toward +inf (fma.rp.f32)."""
    return tl.inline_asm_elementwise("fma.rp.f32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _mul_rd(a, b):
    """fl(a * b) rounded toward -inf (mul.rm.f32)."""
    return tl.inline_asm_elementwise("mul.rm.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _above(d, b: tl.constexpr, h: tl.constexpr):
    """RD((b + h) * d): |x| > this iff |x| / d > b + h (d > 0)."""
    return _fma_rd(tl.full(d.shape, b, tl.float32), d, d * h)


@triton.jit
def _at_least(d, b: tl.constexpr, h: tl.constexpr):
    """RU((b - h) * d): |x| >= this iff |x| / d >= b - h (d > 0)."""
    return _fma_ru(tl.full(d.shape, b, tl.float32), d, -(d * h))


@triton.jit
def _nonzero_threshold(d):
    """RD(d * 2**-150): |x| > this iff RN(|x| / d) != 0. Two RD steps (2**-150 is not an fp32)."""
    return _mul_rd(_mul_rd(d, tl.full(d.shape, 2.0**-64, tl.float32)), tl.full(d.shape, 2.0**-86, tl.float32))


@triton.jit
def _thresholds(d):
    """The eight fp32 thresholds of a block with divisor d (normal and positive, or NaN): t1..t7 of
    the decision points (compared with `>` at t1, t3, t5, t7, `>=` at t2, t4, t6), then `nonzero`."""
    t1 = _above(d, _B1, _H1)
    t2 = _at_least(d, _B2, _H2)
    t3 = _above(d, _B3, _H3)
    t4 = _at_least(d, _B4, _H4)
    t5 = _above(d, _B5, _H5)
    t6 = _at_least(d, _B6, _H6)
    t7 = _above(d, _B7, _H7)
    return t1, t2, t3, t4, t5, t6, t7, _nonzero_threshold(d)


@triton.jit
def _codes_by_thresholds(x, d):
    """The same codes as _codes_by_division, by comparisons (module docstring); d is the per-block
    divisor, normal and positive or NaN."""
    t1, t2, t3, t4, t5, t6, t7, nonzero = _thresholds(d)
    a = tl.abs(x)
    # Each predicate is used right where it is made: live predicates across the 16 elements of a
    # thread would be spilled to registers.
    reaches4 = ~(a < t4)
    bit4 = tl.where(reaches4, 4, 0)
    t26 = tl.where(reaches4, t6, t2)
    t_hi = tl.where(reaches4, t7, t3)
    t_lo = tl.where(reaches4, t5, t1)
    reaches_t26 = ~(a < t26)
    bit2 = tl.where(reaches_t26, 2, 0)
    t_odd = tl.where(reaches_t26, t_hi, t_lo)
    bit1 = tl.where(~(a <= t_odd), 1, 0)
    sign = tl.where(a > nonzero, (x.to(tl.int32, bitcast=True) >> 28) & 8, 0)
    return bit4 | bit2 | bit1 | sign


@triton.jit
def _block_scale(block_amax, g, E2M1_MAX_: tl.constexpr, E4M3_MAX_: tl.constexpr, E4M3_MIN_: tl.constexpr):
    """nvfp4_real_block_scale: bmax / fl(6 g) (IEEE), 0 -> 1, clamped to [2**-9, 448], to E4M3."""
    quotient = tl.div_rn(block_amax, g * E2M1_MAX_)
    g_is_zero = (tl.zeros_like(block_amax) + g) == 0.0  # per block, so `&` is elementwise
    zero_block = (quotient == 0.0) | ((block_amax == 0.0) & g_is_zero)
    quotient = tl.where(zero_block, 1.0, quotient)
    quotient = tl.where(quotient < E4M3_MIN_, E4M3_MIN_, quotient)  # comparisons keep NaN, as clamp
    quotient = tl.where(quotient > E4M3_MAX_, E4M3_MAX_, quotient)
    return quotient.to(tl.float8e4nv)


@triton.jit
def _any_dtype_tile(x_ptr, tile, g, packed_ptr, block_scale_ptr, n_blocks, E2M1_MAX_: tl.constexpr, E4M3_MAX_: tl.constexpr,
                    E4M3_MIN_: tl.constexpr, THRESHOLDS: tl.constexpr, BLOCKS: tl.constexpr):
    """One tile of BLOCKS blocks, any float dtype, in fp32: the codes by fp32 thresholds
    (THRESHOLDS: g in the window) or by the division.

    Every tensor here is one-dimensional, (BLOCKS,): element j of every block is its own load.
    Then one thread owns a block whatever x's alignment, and the block's max, codes and packed
    bytes never leave its registers. With 2-D tiles Triton chooses the layout from x's alignment:
    a (BLOCKS, 16) or (BLOCKS, 4) tile of an x not 16-byte aligned is spread over four threads
    (shuffles and shared memory), and on the H200 such compiles gave codes that changed from one
    launch of the same kernel to the next."""
    block = tile * BLOCKS + tl.arange(0, BLOCKS)
    in_range = block < n_blocks
    start = x_ptr + block.to(tl.int64) * _BLOCK
    x0, x1, x2, x3 = _load_four_fp32(start, in_range)
    x4, x5, x6, x7 = _load_four_fp32(start + 4, in_range)
    x8, x9, x10, x11 = _load_four_fp32(start + 8, in_range)
    x12, x13, x14, x15 = _load_four_fp32(start + 12, in_range)
    # Block max |x| as an integer max of the magnitude bits: NaN propagates, as torch.amax.
    bits = tl.maximum(tl.maximum(_magnitude_bits_max(x0, x1, x2, x3), _magnitude_bits_max(x4, x5, x6, x7)),
                      tl.maximum(_magnitude_bits_max(x8, x9, x10, x11), _magnitude_bits_max(x12, x13, x14, x15)))
    block_scale = _block_scale(bits.to(tl.float32, bitcast=True), g, E2M1_MAX_, E4M3_MAX_, E4M3_MIN_)
    divisor = block_scale.to(tl.float32) * g
    low = _four_codes(x0, x1, x2, x3, divisor, THRESHOLDS) | (_four_codes(x4, x5, x6, x7, divisor, THRESHOLDS) << 16)
    high = _four_codes(x8, x9, x10, x11, divisor, THRESHOLDS) | (_four_codes(x12, x13, x14, x15, divisor, THRESHOLDS) << 16)
    out = packed_ptr.to(tl.pointer_type(tl.int32)) + block.to(tl.int64) * 2  # a block's 8 bytes: two words
    tl.store(out, low, mask=in_range)
    tl.store(out + 1, high, mask=in_range)
    tl.store(block_scale_ptr + block, block_scale, mask=in_range)


@triton.jit
def _load_four_fp32(ptr, in_range):
    """Elements ptr[0..3] of each block, in fp32 (four (BLOCKS,) tensors)."""
    a, b, c, d = load_four(ptr, in_range)
    return a.to(tl.float32), b.to(tl.float32), c.to(tl.float32), d.to(tl.float32)


@triton.jit
def _magnitude_bits_max(a, b, c, d):
    """The largest magnitude's bits of four fp32 (integer order is float order for |x|; NaN tops)."""
    return tl.maximum(tl.maximum(a.to(tl.int32, bitcast=True) & 0x7FFFFFFF, b.to(tl.int32, bitcast=True) & 0x7FFFFFFF),
                      tl.maximum(c.to(tl.int32, bitcast=True) & 0x7FFFFFFF, d.to(tl.int32, bitcast=True) & 0x7FFFFFFF))


@triton.jit
def _element_codes(x, divisor, THRESHOLDS: tl.constexpr):
    """x's E2M1 codes under the per-block divisor: by the thresholds (g in the window) or the division."""
    if THRESHOLDS:
        code = _codes_by_thresholds(x, divisor)
    else:
        code = _codes_by_division(x, divisor)
    return code


@triton.jit
def _four_codes(a, b, c, d, divisor, THRESHOLDS: tl.constexpr):
    """Four consecutive elements' codes packed into the low 16 bits: two bytes, the earlier
    element of each pair in the low nibble."""
    return (_element_codes(a, divisor, THRESHOLDS) | (_element_codes(b, divisor, THRESHOLDS) << 4)
            | (_element_codes(c, divisor, THRESHOLDS) << 8) | (_element_codes(d, divisor, THRESHOLDS) << 12))


# --- bf16: two elements a 32-bit register, compared as bf16x2 -------------------------------------


@triton.jit
def _max_u16x2(a, b):
    """Halfwise unsigned max of two bf16x2 magnitude words (for non-negative floats, integer order
    is float order, and NaN patterns sort above inf)."""
    return tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _permute(a, b, selector: tl.constexpr):
    """prmt.b32: byte i of the result is byte selector[i] of (b:a) (a's bytes 0-3, b's 4-7)."""
    return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {selector};", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _high_half_twice(bits):
    """The top 16 bits of a word in both of its halves."""
    return _permute(bits, bits, 0x3232)


@triton.jit
def _bf16_pair_rd(t):
    """fp32 t >= 0 (or NaN) -> RD_bf16(t) in both halves of a word: truncation (a quiet NaN keeps
    its top mantissa bit, so it stays NaN)."""
    return _high_half_twice(t.to(tl.int32, bitcast=True))


@triton.jit
def _bf16_pair_ru(t):
    """fp32 t >= 0 -> RU_bf16(t) in both halves of a word. A NaN t may come out as NaN, -0.0 or
    0.0: the ladder compares with it by `set.geu`, which holds for every |x| against any of them,
    as against NaN."""
    return _high_half_twice(t.to(tl.int32, bitcast=True) + 0xFFFF)


# The bf16 element step, the ladder: each of the seven decision points adds one to a count where
# |x| passes its threshold (RN(|x| / d) only grows with |x|, so the count is the E2M1 index), and
# the sign test (x < -t0) adds eight. The count is a bf16 in each half of the word: `set` with a
# bf16x2 result gives 1.0 or 0.0 in each half, and an FMA adds it times one ulp of LADDER_BASE (or
# eight ulps), so a half ends as LADDER_BASE + code ulps, exactly, whose bits are LADDER_BASE's
# plus the code (the code is below 16, the mantissa has 7 bits). All of it is bf16x2 arithmetic:
# the binary search it replaced selected thresholds and assembled bits with lop3 on the ALU pipe,
# which issues a warp's instruction every other cycle, and that pipe bounded the kernel on the
# H200. LADDER_BASE's exponent field is even and below 32, so a half's bits 7..4 and 15..12 are
# zero, which _packed_word relies on.
# NaN: `set.gtu` / `set.geu` hold for a NaN |x| or a NaN threshold (index 7, as the reference),
# `set.lt` does not (no sign bit).
LADDER_BASE = 0x0F00  # bf16 2**-97 (exponent field 30)
LADDER_ONE = 0x0B80  # bf16 2**-104, one ulp of LADDER_BASE
LADDER_EIGHT = 0x0D00  # bf16 2**-101, eight ulps
# Operands: $1 |x| (abs.bf16x2), $2 x, $3..$9 t1..t7 (> at odd k, >= at even k), $10 -t0.
# One line: inductor copies a user kernel's globals into its generated source as string literals.
_PAIR_CODES_PTX = tl.constexpr(
    " ".join(
        [
            "{",
            ".reg .b32 s, c, one, eight;",
            f"mov.b32 c, {LADDER_BASE * 0x10001:#x};",  # the same bf16 in both halves
            f"mov.b32 one, {LADDER_ONE * 0x10001:#x};",
            f"mov.b32 eight, {LADDER_EIGHT * 0x10001:#x};",
        ]
        + [f"set.{'gtu' if k % 2 else 'geu'}.bf16x2.bf16x2 s, $1, ${k + 2}; fma.rn.bf16x2 c, s, one, c;" for k in range(1, 8)]
        + ["set.lt.bf16x2.bf16x2 s, $2, $10;", "fma.rn.bf16x2 $0, s, eight, c;", "}"]
    )
)


@triton.jit
def _bf16_pair_codes(magnitude, pairs, t1, t2, t3, t4, t5, t6, t7, negated_t0):
    return tl.inline_asm_elementwise(_PAIR_CODES_PTX, "=r,r,r,r,r,r,r,r,r,r,r",
                                     [magnitude, pairs, t1, t2, t3, t4, t5, t6, t7, negated_t0], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _abs_bf16x2(pairs):
    """|x| of both halves (abs.bf16x2: the FMA pipe; -0.0 -> 0.0, NaN stays NaN)."""
    return tl.inline_asm_elementwise("abs.bf16x2 $0, $1;", "=r,r", [pairs], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _four_columns(words):
    """(BLOCKS, 4) -> its 4 columns, each (BLOCKS,), in order (register moves: one thread a row)."""
    rows: tl.constexpr = words.shape[0]
    even, odd = tl.split(tl.reshape(words, [rows, 2, 2]))  # columns 0 2 / 1 3
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _packed_word(codes):
    """Four ladder words (BLOCKS, 4), eight elements in order, -> the word of their four packed
    bytes (element 2j in byte j's low nibble, 2j + 1 in its high one)."""
    c0, c1, c2, c3 = _four_columns(codes)
    # The low byte of each half, (e0, e2, e1, e3) as bytes 0..3; then adding d >> 12 puts e1 and
    # e3 into the high nibbles of bytes 0 and 1 (the ladder's bits 7..4 and 15..12 are zero, so
    # no bits overlap: one LEA.HI).
    low = _permute(c0, c1, 0x6240)
    high = _permute(c2, c3, 0x6240)
    low = low + (low >> 12)
    high = high + (high >> 12)
    return _permute(low, high, 0x5410)


@triton.jit
def _load_bf16_pairs(pairs_ptr, tile, n_blocks, BLOCKS: tl.constexpr):
    """A tile's blocks as words of two bf16: (BLOCKS, 4) for each half block, one thread a block."""
    block = tile * BLOCKS + tl.arange(0, BLOCKS)
    word = pairs_ptr + block[:, None].to(tl.int64) * (_BLOCK // 2) + tl.arange(0, _BLOCK // 4)[None, :]
    in_range = (block < n_blocks)[:, None]
    return tl.load(word, mask=in_range), tl.load(word + _BLOCK // 4, mask=in_range)


@triton.jit
def _bf16_pairs_tile(first, second, tile, g, packed_ptr, block_scale_ptr, n_blocks, E2M1_MAX_: tl.constexpr,
                     E4M3_MAX_: tl.constexpr, E4M3_MIN_: tl.constexpr, BLOCKS: tl.constexpr):
    """One tile of bf16 blocks under a global scale in the window, from its words."""
    block = tile * BLOCKS + tl.arange(0, BLOCKS)
    magnitude_first, magnitude_second = _abs_bf16x2(first), _abs_bf16x2(second)
    magnitudes = tl.reduce(_max_u16x2(magnitude_first, magnitude_second), 1, _max_u16x2)
    magnitudes = tl.maximum(magnitudes & 0xFFFF, (magnitudes >> 16) & 0xFFFF)
    block_amax = (magnitudes << 16).to(tl.float32, bitcast=True)  # the bf16 max, exactly, in fp32
    block_scale = _block_scale(block_amax, g, E2M1_MAX_, E4M3_MAX_, E4M3_MIN_)
    d = block_scale.to(tl.float32) * g
    # The fp32 thresholds of _codes_by_thresholds, rounded onto bf16: for bf16 |x|, |x| >= t iff
    # |x| >= RU_bf16(t), and |x| > t iff |x| > RD_bf16(t) (bf16 values are fp32 values).
    t1, t2, t3, t4, t5, t6, t7, t0 = _thresholds(d)
    t1, t3, t5, t7 = _bf16_pair_rd(t1)[:, None], _bf16_pair_rd(t3)[:, None], _bf16_pair_rd(t5)[:, None], _bf16_pair_rd(t7)[:, None]
    negated_t0 = (_bf16_pair_rd(t0) ^ -2147450880)[:, None]  # 0x80008000: both halves' sign bits
    t2, t4, t6 = _bf16_pair_ru(t2)[:, None], _bf16_pair_ru(t4)[:, None], _bf16_pair_ru(t6)[:, None]
    word_first = _packed_word(_bf16_pair_codes(magnitude_first, first, t1, t2, t3, t4, t5, t6, t7, negated_t0))
    word_second = _packed_word(_bf16_pair_codes(magnitude_second, second, t1, t2, t3, t4, t5, t6, t7, negated_t0))
    words = tl.join(word_first, word_second)  # (BLOCKS, 2): a block's 8 bytes
    out = packed_ptr.to(tl.pointer_type(tl.int32)) + block[:, None].to(tl.int64) * 2 + tl.arange(0, 2)[None, :]
    tl.store(out, words, mask=(block < n_blocks)[:, None])
    tl.store(block_scale_ptr + block, block_scale, mask=block < n_blocks)


@triton.jit
def _global_scale(scale_source_ptr, SCALE_FROM: tl.constexpr, RCP_2688_: tl.constexpr, DENOMINATOR: tl.constexpr):
    """The fp32 global scale: read as it is, or refquant.numerics.nvfp4.global_scale_from_amax of
    the amax read (amax * fp32(1/2688) for modelopt's CUDA flavor, amax / 2688 (IEEE) for its CPU
    one)."""
    value = tl.load(scale_source_ptr)
    if SCALE_FROM == _FROM_AMAX_TIMES_RCP_2688:
        value = value * RCP_2688_
    elif SCALE_FROM == _FROM_AMAX_OVER_2688:
        value = tl.div_rn(value, DENOMINATOR)
    return value


@triton.jit
def _nvfp4_blocks_kernel(
    x_ptr,
    scale_source_ptr,
    global_scale_ptr,
    packed_ptr,
    block_scale_ptr,
    n_blocks,
    SCALE_FROM: tl.constexpr,
    RCP_2688_: tl.constexpr,
    DENOMINATOR: tl.constexpr,
    E2M1_MAX_: tl.constexpr,
    E4M3_MAX_: tl.constexpr,
    E4M3_MIN_: tl.constexpr,
    G_MIN: tl.constexpr,
    G_MAX: tl.constexpr,
    BF16_PAIRS: tl.constexpr,
    BLOCKS: tl.constexpr,
    ANY_DTYPE_BLOCKS: tl.constexpr,
):
    """Persistent: program p takes tiles p, p + programs, ... of BLOCKS blocks each. Every program
    computes the global scale; program 0 also writes it (when it was computed from an amax)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_blocks, BLOCKS)
    g = _global_scale(scale_source_ptr, SCALE_FROM, RCP_2688_, DENOMINATOR)
    if SCALE_FROM != _GIVEN_GLOBAL_SCALE:
        if pid == 0:
            tl.store(global_scale_ptr, g)
    in_window = (g >= G_MIN) & (g <= G_MAX)
    if BF16_PAIRS and in_window:
        # The next tile's words are loaded before this one's are used: loads stay in flight.
        pairs_ptr = x_ptr.to(tl.pointer_type(tl.int32))
        first_next, second_next = _load_bf16_pairs(pairs_ptr, pid, n_blocks, BLOCKS)
        for tile in range(pid, n_tiles, programs):
            first, second = first_next, second_next
            first_next, second_next = _load_bf16_pairs(pairs_ptr, tile + programs, n_blocks, BLOCKS)
            _bf16_pairs_tile(first, second, tile, g, packed_ptr, block_scale_ptr, n_blocks, E2M1_MAX_, E4M3_MAX_, E4M3_MIN_, BLOCKS)
    else:
        # Smaller tiles here: the kernel's register count is its most demanding path's, and this
        # one must not lower the occupancy of the bf16 path.
        for tile in range(pid, tl.cdiv(n_blocks, ANY_DTYPE_BLOCKS), programs):
            if in_window:
                _any_dtype_tile(x_ptr, tile, g, packed_ptr, block_scale_ptr, n_blocks, E2M1_MAX_, E4M3_MAX_, E4M3_MIN_, True, ANY_DTYPE_BLOCKS)
            else:
                _any_dtype_tile(x_ptr, tile, g, packed_ptr, block_scale_ptr, n_blocks, E2M1_MAX_, E4M3_MAX_, E4M3_MIN_, False, ANY_DTYPE_BLOCKS)


@functools.cache
def _programs(device_index: int) -> int:
    """Persistent grid: PROGRAMS_PER_SM programs on each SM of the device (asked once a device)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count * PROGRAMS_PER_SM


def kernel_constants(bf16_pairs: bool, scale_from: int = GIVEN_GLOBAL_SCALE) -> dict[str, float | int | bool]:
    """_nvfp4_blocks_kernel's constexpr arguments (also used by scripts/triton_sass.py and
    benchmarks/probes/nvfp4_tiles.py); bf16_pairs: x is bf16 and 16-byte aligned; scale_from: what
    the kernel's scale_source_ptr holds (GIVEN_GLOBAL_SCALE, FROM_AMAX_TIMES_RCP_2688,
    FROM_AMAX_OVER_2688)."""
    return {
        "SCALE_FROM": scale_from,
        "RCP_2688_": RCP_2688,
        "DENOMINATOR": NVFP4_SCALE_DENOMINATOR,
        "E2M1_MAX_": E2M1_MAX,
        "E4M3_MAX_": E4M3_MAX,
        "E4M3_MIN_": E4M3_MIN_SUBNORMAL,
        "G_MIN": THRESHOLD_PATH_MIN_GLOBAL_SCALE,
        "G_MAX": THRESHOLD_PATH_MAX_GLOBAL_SCALE,
        "BF16_PAIRS": bf16_pairs,
        "BLOCKS": BLOCKS_PER_PROGRAM,
        "ANY_DTYPE_BLOCKS": ANY_DTYPE_BLOCKS_PER_PROGRAM,
    }


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (packed bytes, block scales) for x."""
    packed = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    block_scale = torch.empty((*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=x.device)
    return packed, block_scale


def _takes_bf16_pairs(x: torch.Tensor) -> bool:
    """The bf16 path reads (BLOCKS, 4) tiles of words, and only for a 16-byte aligned x does Triton
    give each thread a whole row of such a tile; for any other x it spreads a row over threads
    (scripts/triton_sass.py --unaligned-x), the layouts whose results changed from launch to launch
    on the H200, so that x takes the any-dtype path, one-dimensional."""
    return x.dtype == torch.bfloat16 and starts_aligned(x, 16)


def _launch(x: torch.Tensor, scale_source: torch.Tensor, global_scale: torch.Tensor, scale_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed, block_scale = _outputs(x)
    wrap_triton(_nvfp4_blocks_kernel)[(_programs(x.device.index or 0),)](
        x,
        scale_source,
        global_scale,
        packed,
        block_scale,
        x.numel() // NVFP4_BLOCK_SIZE,
        **kernel_constants(_takes_bf16_pairs(x), scale_from),
        num_warps=NUM_WARPS,
    )
    return packed, block_scale


@triton_op("refquant::nvfp4_quantize_blocks", mutates_args=())
def nvfp4_quantize_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """refquant.numerics.nvfp4.nvfp4_quantize_blocks: (packed bytes (..., n/2) uint8, block scales
    (..., n/16) float8_e4m3fn) of a contiguous CUDA x whose last dim is a multiple of 16, under an
    fp32 0-d global scale."""
    return _launch(x, global_scale, global_scale, GIVEN_GLOBAL_SCALE)


@triton_op("refquant::nvfp4_quantize_from_amax", mutates_args=())
def nvfp4_quantize_from_amax(x: torch.Tensor, amax: torch.Tensor, ieee_division: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same under an fp32 0-d global amax, with the global scale computed in the kernel
    (refquant.numerics.nvfp4.global_scale_from_amax: amax / 2688 (IEEE) when ieee_division, the
    "modelopt-cpu" flavor, else amax * fp32(1/2688)): (packed bytes, block scales, global scale of
    shape (1,)), one launch.

    The global scale has shape (1,), not (): inductor makes a 0-d torch.empty a kernel of its own
    (its lowering of empty_strided gives a 0-d buffer one element to compute), a second launch."""
    global_scale = torch.empty(1, dtype=torch.float32, device=x.device)
    scale_from = FROM_AMAX_OVER_2688 if ieee_division else FROM_AMAX_TIMES_RCP_2688
    packed, block_scale = _launch(x, amax, global_scale, scale_from)
    return packed, block_scale, global_scale


@functools.cache
def _direct_launch(bf16_pairs: bool, scale_from: int) -> DirectLaunch:
    return DirectLaunch(_nvfp4_blocks_kernel, kernel_constants(bf16_pairs, scale_from), NUM_WARPS, outputs_written(scale_from))


def outputs_written(scale_from: int) -> tuple[str, ...]:
    """The arguments _nvfp4_blocks_kernel writes in full: the packed bytes and block scales, and
    the global scale where it computes it (otherwise that argument is the scale it reads)."""
    written = ("packed_ptr", "block_scale_ptr")
    return written if scale_from == GIVEN_GLOBAL_SCALE else ("global_scale_ptr", *written)


def nvfp4_quantize_from_amax_now(x: torch.Tensor, amax: torch.Tensor, ieee_division: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nvfp4_quantize_from_amax launched eagerly (refquant.compiled.triton_launch), past the
    dispatcher and any graph (for calls outside torch.compile: refquant.compiled.nvfp4_quantize
    with a given amax). Same arguments, same results; the amax an fp32 0-d tensor on x's device."""
    global_scale = torch.empty(1, dtype=torch.float32, device=x.device)
    scale_from = FROM_AMAX_OVER_2688 if ieee_division else FROM_AMAX_TIMES_RCP_2688
    packed, block_scale = _outputs(x)
    launch = _direct_launch(_takes_bf16_pairs(x), scale_from)
    launch(_programs(x.device.index or 0), x, amax, global_scale, packed, block_scale, x.numel() // NVFP4_BLOCK_SIZE)
    return packed, block_scale, global_scale
