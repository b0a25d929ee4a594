"""NVFP4 fake and real quantization, bit for bit as modelopt computes it.

NVFP4 stores E2M1 values in blocks of 16 along the last dim; each block has an E4M3 scale and the
tensor has one fp32 global scale = global_amax / 2688 (2688 = 6 * 448, so the largest block scale,
448, times the largest E2M1 value, 6, reaches global_amax).

Two modelopt paths, which differ on purpose-less details (docs/numerics.md has the table):
- fake quant = the Triton kernel behind TensorQuantizer (docs/modelopt_behaviour.md §3.3), the one
  modelopt uses during PTQ, with its approximate division (refquant.numerics.gpu_division);
- real quant = NVFP4QTensor.quantize / dequantize (§4), used for export and compression.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .checks import AmaxLike, Flavor, as_amax_tensor, check_flavor, check_float_input, max_abs
from .fp8 import divide_by_constant
from .gpu_division import approx_reciprocal_fp32
from .straight_through import straight_through
from .formats import (
    E4M3_DTYPE,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    E2M1_MAX,
    NVFP4_BLOCK_SCALE_FLOOR,
    NVFP4_BLOCK_SIZE,
    NVFP4_GLOBAL_SCALE_FLOOR,
    NVFP4_SCALE_DENOMINATOR,
    RCP_2688,
    e2m1_code_table,
)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def e2m1_round_magnitude(u: torch.Tensor) -> torch.Tensor:
    """|u| >= 0 rounded to the E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} (fp32; NaN -> 6).

    The E2M1 grid is evenly spaced within each binade: steps of 0.5 below 2, of 1 in [2, 4), of 2
    from 4 up to 6. So the rounding is "nearest multiple of the step, ties to even", capped at 6,
    and fp32 addition does exactly that: adding step * 2**23 leaves a sum whose last bit is worth
    `step`, so the hardware rounds |u| to a multiple of the step (ties to an even multiple, which
    is the even E2M1 index), and subtracting it back is exact. This gives the decision points of
    docs/modelopt_behaviour.md §3.4 (E2M1_DECISION_POINTS: 0.25, 1.25, 2.5 and 5 round down, 0.75,
    1.75 and 3.5 round up); tests/test_exhaustive_bf16.py checks it against a nearest-even oracle
    on every bf16 pattern and on the fp32 neighbours of every decision point. (A ladder of seven
    comparisons says the same; this shape is a few instructions per element, which on an H100 is
    the difference between a compute-bound and a bandwidth-bound kernel, docs/compiled.md.)
    u >= 2**24 or inf rounds past 6 and is capped; NaN fails `q < 6` and becomes 6, as in
    modelopt's kernel, whose comparisons NaN passes.
    """
    step = torch.where(u < 2.0, 0.5, torch.where(u < 4.0, 1.0, 2.0))
    shift = step * 2.0**23
    q = (u + shift) - shift
    return torch.where(q < E2M1_MAX, q, E2M1_MAX)


def e2m1_magnitude_index(u: torch.Tensor) -> torch.Tensor:
    """Index 0..7 into E2M1_MAGNITUDES of the E2M1 rounding of |u| >= 0 (uint8; NaN -> 7).

    From the rounded magnitude q: 2q up to 2 (indices 0..4), q + 2 for 3 and 4 (5, 6), 7 for 6.
    """
    q = e2m1_round_magnitude(u)
    return torch.where(q <= 2.0, q * 2.0, torch.where(q <= 4.0, q + 2.0, 7.0)).to(torch.uint8)


def pad_to_blocks(x: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE) -> torch.Tensor:
    """Zero-pad the last dim up to a multiple of block_size (what modelopt does for the max)."""
    pad = (-x.shape[-1]) % block_size
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def to_blocks(x: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE) -> torch.Tensor:
    """(..., n) -> (..., ceil(n / block_size), block_size), zero-padded."""
    return pad_to_blocks(x, block_size).unflatten(-1, (-1, block_size))


def resolve_global_amax(x: torch.Tensor, amax: AmaxLike, *, per_slice: bool = False) -> torch.Tensor:
    """fp32 global amax: the given one, or max|x| taken in x's dtype (NaN propagates). 0-d, or
    with `per_slice` (fake quant) also keep-dims with a last dim of 1: one global amax per slice,
    e.g. (E, 1, 1) for the E experts of an (E, N, K) weight (see is_per_slice_amax)."""
    if amax is None:
        return max_abs(x).float()
    amax = as_amax_tensor(amax, x)
    if amax.numel() == 1:
        return amax.reshape(()).float()
    if per_slice and is_per_slice_amax(amax, x):
        return amax.float()
    slices = (" or a keep-dims tensor with a last dim of 1 (one global amax per slice)" if per_slice else
              " (or, with per_slice_amax=True, one global amax per slice of x)")
    raise ValueError(
        f"NVFP4 takes one global amax per tensor, got shape {tuple(amax.shape)} for x of shape "
        f"{tuple(x.shape)}; per-block scales are computed from the data. Pass a float or a 0-d tensor{slices}."
    )


def is_per_slice_amax(amax: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `amax` gives NVFP4 fake quant one global amax per slice of x: x's ndim, size 1 on
    the last dim (a block of 16 never spans two slices), each other dim 1 or x's size."""
    return (
        amax.ndim == x.ndim
        and amax.shape[-1] == 1
        and all(a in (1, s) for a, s in zip(amax.shape, x.shape))
    )


def global_scale_from_amax(amax: torch.Tensor, flavor: Flavor) -> torch.Tensor:
    """fp32 global scale = amax / 2688: IEEE on CPU, amax * fp32(1/2688) on CUDA (P2)."""
    if flavor == "modelopt-cpu":
        return divide_by_constant(amax, NVFP4_SCALE_DENOMINATOR)
    return amax * RCP_2688


def _check_nonempty_last_dim(x: torch.Tensor) -> None:
    if x.ndim == 0:
        raise ValueError("NVFP4 quantizes blocks along the last dim; x is 0-d. Reshape it to (1,) or more.")


# ---------------------------------------------------------------------------------------------
# Fake quant: modelopt's Triton kernel fp4_fake_quant_block (docs/modelopt_behaviour.md §3.3)
# ---------------------------------------------------------------------------------------------


def nvfp4_fake_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-block fp32 scale S of the fake-quant kernel, from the block max |x| and the global scale.

    block_amax ignores NaN elements and is NaN only for an all-NaN block (Triton's tl.max).
    g' = global scale, or 1e-12 when it is not > 0 (0 or NaN); t = div.full(m, fl(6 g')) (the
    kernel's approximate division, refquant.numerics.gpu_division); t = min(t, 448), where a NaN t gives 448
    (tl.minimum returns the number); e = E4M3(t); S = fl(e * g'), replaced by 1.0 below 1e-5 (tiny
    or all-zero blocks).
    """
    return nvfp4_fake_block_scale_detail(block_amax, global_scale).scale


class FakeBlockScale(NamedTuple):
    """The fake-quant kernel's block scale S, per block, with what its two guards looked at."""

    scale: torch.Tensor  # S, fp32, block_amax's shape
    ideal: torch.Tensor  # t = m ÷ fl(6 g'), fp32, before min(t, 448) and the E4M3 rounding
    fell_back: torch.Tensor  # bool: fl(e * g') < 1e-5 (or NaN), so S was replaced by 1.0


def nvfp4_fake_block_scale_detail(block_amax: torch.Tensor, global_scale: torch.Tensor) -> FakeBlockScale:
    """nvfp4_fake_block_scale's steps, returning S, the ideal scale t before its clamp to 448, and
    the blocks whose S fell back to 1.0 (the PTQ report counts both, refquant.quant.metrics);
    nvfp4_fake_block_scale is `.scale` of this."""
    g = torch.where(global_scale > 0, global_scale, torch.full_like(global_scale, NVFP4_GLOBAL_SCALE_FLOOR))
    # m / fl(6 g') as the kernel divides. fl(6 g') is +inf or within [6e-12, 2^120): its reciprocal
    # is a normal fp32 (or 0), so the fp32 product rounds the exact m * R once, as div.full.f32 does.
    ideal = block_amax * approx_reciprocal_fp32(g * E2M1_MAX)
    clamped = torch.where(ideal < E4M3_MAX, ideal, E4M3_MAX)  # NaN fails the test: 448, as tl.minimum
    scale = clamped.to(E4M3_DTYPE).float() * g
    kept = scale >= NVFP4_BLOCK_SCALE_FLOOR
    return FakeBlockScale(torch.where(kept, scale, torch.ones_like(scale)), ideal, ~kept)


def nan_ignoring_block_max(magnitude: torch.Tensor) -> torch.Tensor:
    """max over the last dim of |x| >= 0 skipping NaN, NaN when every element is NaN (Triton's tl.max).

    One reduction: NaN enters as -1, below every magnitude, so a max of -1 marks an all-NaN block.
    """
    block_max = torch.where(torch.isnan(magnitude), -1.0, magnitude).amax(dim=-1, keepdim=True)
    return torch.where(block_max < 0, float("nan"), block_max)


def nvfp4_fake_quant(
    x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu", per_slice_amax: bool = False
) -> torch.Tensor:
    """NVFP4 fake quantization, modelopt's Triton kernel bit for bit; same shape and dtype out.

    amax: the global amax (float or 0-d tensor); None takes max|x| of the whole tensor. With
    per_slice_amax=True it may also hold one global amax per slice (is_per_slice_amax: keep-dims,
    last dim 1, e.g. (E, 1, 1) for an (E, N, K) stack of expert weights), which gives each slice,
    bit for bit, what a call on that slice alone with its own amax gives: every step below is per
    element or per block.
    One path for both flavors (docs/contract.md §3): global scale = amax * fp32(1/2688); block
    scales as nvfp4_fake_block_scale; each element is |x| / S by the kernel's approximate division
    (div.full.f32, refquant.numerics.gpu_division) rounded to E2M1; output fl(q * S) with the sign of x,
    +0.0 for a negative that rounds to zero, NaN elements come out as -6 * S. A last dim that is
    not a multiple of 16 is zero-padded for the block max and the padding dropped.
    `flavor` is accepted for a uniform call signature and checked, but changes nothing: modelopt
    has this one fake-quant path on every device.
    Gradient: modelopt's straight-through one, the upstream gradient unchanged for x and none for
    amax (refquant.numerics.straight_through).
    """
    check_flavor(flavor)
    check_float_input(x)
    _check_nonempty_last_dim(x)
    if x.numel() == 0:
        return x.clone()
    return straight_through(nvfp4_fake_quant_blocks, x, resolve_global_amax(x.detach(), amax, per_slice=per_slice_amax))


def nvfp4_fake_quant_blocks(x: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """nvfp4_fake_quant's work under a given fp32 global amax (x non-empty, at least 1-d): 0-d, or
    one per slice (keep-dims, last dim 1); a pure function of the values, without
    nvfp4_fake_quant's gradient.

    (refquant.compiled runs this step as a Triton kernel on CUDA for a 0-d amax,
    refquant.compiled.nvfp4_fake_triton.)
    """
    # modelopt's Triton wrapper divides a CUDA tensor: the "modelopt-cuda" rule on every device.
    global_scale = global_scale_from_amax(global_amax, "modelopt-cuda")
    if global_scale.ndim:
        global_scale = global_scale.unsqueeze(-1)  # (..., 1) -> (..., 1, 1): over (..., blocks, 16)
    blocks = to_blocks(x.float())
    magnitude = blocks.abs()
    scale = nvfp4_fake_block_scale(nan_ignoring_block_max(magnitude), global_scale)
    # |x| / S as the kernel divides. S is 1.0, +inf (an inf global amax) or in [1e-5, 2^126): R(S)
    # is a normal fp32 or 0, so an fp32 multiply by it rounds the exact product once, as
    # div.full.f32 does (approx_reciprocal_fp32).
    q = e2m1_round_magnitude(magnitude * approx_reciprocal_fp32(scale))
    p = q * scale
    # `0 - p`, not `-p`: the kernel's unary minus never produces -0.0 (P7).
    # Rounded to x's dtype in the block layout, then flattened: under torch.compile the output
    # is then written by the kernel that reduces the blocks (a crop first would split it in two).
    y = torch.where(blocks >= 0, p, 0.0 - p).to(x.dtype).flatten(-2)
    return y if y.shape[-1] == x.shape[-1] else y[..., : x.shape[-1]].contiguous()


# ---------------------------------------------------------------------------------------------
# Real quant: NVFP4QTensor (docs/modelopt_behaviour.md §4)
# ---------------------------------------------------------------------------------------------


@dataclass
class NVFP4Tensor:
    """Real-quantized NVFP4 tensor, laid out as modelopt's NVFP4QTensor.

    packed:       uint8 (..., ceil(n/16) * 8); byte j holds element 2j in its low nibble and
                  element 2j+1 in its high nibble; bit 3 of a nibble is the sign.
    block_scale:  float8_e4m3fn (..., ceil(n/16)), one per block of 16 along the last dim.
    global_scale: fp32 0-d, global_amax / 2688 (rounded per flavor).
    shape:        the original shape (the last dim may be shorter than the padded blocks).
    dtype:        the original dtype, the default of dequantize().
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    def codes(self) -> torch.Tensor:
        """The 4-bit E2M1 codes, one uint8 per (padded) element."""
        return unpack_e2m1(self.packed)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """value(code) * fl(fp32(block scale) * global scale), in fp32, rounded to `dtype`.

        Returns the original shape (modelopt raises for a padded last dim; we crop). The leading
        dims are packed's; only the last one comes from `shape`.
        """
        dtype = dtype or self.dtype
        values = e2m1_code_table(self.packed.device)[self.codes().long()]
        scale = self.block_scale.float().unsqueeze(-1) * self.global_scale
        out = (values.unflatten(-1, (-1, NVFP4_BLOCK_SIZE)) * scale).flatten(-2)
        return out[..., : self.shape[-1]].to(dtype)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2k) uint8 codes -> (..., k) bytes: even element in the low nibble."""
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def pack_e2m1_blocks(codes: torch.Tensor) -> torch.Tensor:
    """(..., nblocks, 16) uint8 codes -> (..., nblocks * 8) bytes, the same bytes as pack_e2m1.

    One int64 word per block, code k at bits 4k..4k+3; read as 8 little-endian bytes, byte j is
    then code 2j (low nibble) and code 2j+1 (high nibble), pack_e2m1's layout. The word is a sum
    over the block (the codes don't overlap, so the sum is their bitwise OR), so under
    torch.compile it is computed by the kernel that reduces the block's max, and the bytes are a
    free view of it (docs/compiled.md). Code 15 holds the word's sign bit, so it enters as a
    signed 4-bit value and no partial sum overflows.
    """
    if codes.shape[-1] != 16:
        raise ValueError(f"pack_e2m1_blocks takes blocks of 16 codes, got a last dim of {codes.shape[-1]}.")
    if sys.byteorder != "little":
        raise RuntimeError("pack_e2m1_blocks reads int64 words as bytes and needs a little-endian machine.")
    shift = torch.arange(0, 64, 4, dtype=torch.int64, device=codes.device)
    nibble = codes.to(torch.int64)
    nibble = torch.where((shift == 60) & (nibble >= 8), nibble - 16, nibble)
    words = (nibble << shift).sum(dim=-1)
    # Flattened before the view: inductor on CUDA failed to lower the int64 -> uint8 view of a
    # (rows, 1) word tensor (one block per row); a 1-D view is plain.
    return words.reshape(-1).view(torch.uint8).reshape(*codes.shape[:-2], -1)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k) uint8 codes; inverse of pack_e2m1."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def nvfp4_real_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4QTensor's E4M3 block scale from the block max |x| (fp32) and the global scale.

    bmax / fl(6 * global scale), IEEE; a zero quotient becomes 1.0; clamped to [2**-9, 448].
    Deviation (docs/contract.md §5): a zero block under a zero global scale (an all-zero tensor)
    gets 1.0, where modelopt's 0/0 gives NaN.
    """
    quotient = block_amax / (global_scale * E2M1_MAX)
    zero_block = (quotient == 0) | ((block_amax == 0) & (global_scale == 0))
    quotient = torch.where(zero_block, torch.ones_like(quotient), quotient)
    return quotient.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(E4M3_DTYPE)


def nvfp4_quantize(x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu") -> NVFP4Tensor:
    """Real NVFP4 quantization: modelopt's NVFP4QTensor.quantize(x, 16, wsf2=amax / 2688).

    amax: the global amax (float or 0-d tensor); None takes max|x| in x's dtype. The global scale
    is amax / 2688 rounded per flavor ("modelopt-cpu": IEEE division; "modelopt-cuda": multiply
    by fp32(1/2688)). Blocks: nvfp4_real_block_scale; elements: x / fl(fp32(block scale) *
    global scale) (IEEE) rounded to E2M1, sign bit set when the quotient is < 0 (so -0.0 gets
    code 0 and a small negative code 8). NaN gets code 7.
    """
    check_flavor(flavor)
    check_float_input(x)
    _check_nonempty_last_dim(x)
    if x.numel() == 0:
        raise ValueError(f"x of shape {tuple(x.shape)} is empty: there is nothing to quantize.")
    global_scale = global_scale_from_amax(resolve_global_amax(x, amax), flavor)
    packed, block_scale = nvfp4_quantize_blocks_in_pieces(x, global_scale)
    return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=global_scale, shape=x.shape, dtype=x.dtype)


# nvfp4_quantize_blocks makes about 35 bytes of temporaries per element (fp32 blocks and quotients,
# the E2M1 rounding, an int64 word per block for the packing): 17x a bf16 input over a whole
# tensor. Eagerly, a large tensor goes through it in pieces, at most QUANTIZE_PIECES of them and
# each at least PIECE_MIN_ELEMENTS long (at most ~35 MiB of temporaries): a 4096 x 4096 bf16
# tensor allocates at most 1.4x its size (44 MiB, against 553 MiB whole), and runs faster on a CPU
# (the pieces stay in cache). Under torch.compile the whole tensor is one graph, whose fused
# kernels keep no such temporaries.
QUANTIZE_PIECES = 16
PIECE_MIN_ELEMENTS = 1 << 20


def nvfp4_quantize_blocks_in_pieces(
    x: torch.Tensor, global_scale: torch.Tensor, piece_elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """nvfp4_quantize_blocks(x, global_scale), bit for bit (blocks are independent), computed on
    pieces of about `piece_elements` elements (default: the larger of 1/QUANTIZE_PIECES of x and
    PIECE_MIN_ELEMENTS): runs of whole rows of x's last dim, or, for rows longer than a piece,
    runs of whole blocks of one row. The outputs are written into tensors allocated once."""
    if piece_elements is None:
        piece_elements = max(PIECE_MIN_ELEMENTS, -(-x.numel() // QUANTIZE_PIECES))
    if torch.compiler.is_compiling() or x.numel() <= piece_elements:
        return nvfp4_quantize_blocks(x, global_scale)
    row_length = x.shape[-1]
    rows = x.reshape(-1, row_length)
    blocks_per_row = -(-row_length // NVFP4_BLOCK_SIZE)
    packed = torch.empty(rows.shape[0], blocks_per_row * NVFP4_BLOCK_SIZE // 2, dtype=torch.uint8, device=x.device)
    block_scale = torch.empty(rows.shape[0], blocks_per_row, dtype=E4M3_DTYPE, device=x.device)
    rows_per_piece = piece_elements // row_length
    if rows_per_piece >= 1:
        for first in range(0, rows.shape[0], rows_per_piece):
            piece = slice(first, first + rows_per_piece)
            packed[piece], block_scale[piece] = nvfp4_quantize_blocks(rows[piece], global_scale)
    else:
        blocks_per_piece = max(1, piece_elements // NVFP4_BLOCK_SIZE)
        for row in range(rows.shape[0]):
            for first_block in range(0, blocks_per_row, blocks_per_piece):
                blocks = slice(first_block, first_block + blocks_per_piece)
                columns = rows[row, first_block * NVFP4_BLOCK_SIZE : (first_block + blocks_per_piece) * NVFP4_BLOCK_SIZE]
                bytes_ = slice(blocks.start * NVFP4_BLOCK_SIZE // 2, blocks.stop * NVFP4_BLOCK_SIZE // 2)
                packed[row, bytes_], block_scale[row, blocks] = nvfp4_quantize_blocks(columns, global_scale)
    lead = x.shape[:-1]
    return packed.reshape(*lead, -1), block_scale.reshape(*lead, -1)


def nvfp4_quantize_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4QTensor's per-block step under a given fp32 0-d global scale: (packed bytes
    (..., ceil(n/16) * 8) uint8, block scales (..., ceil(n/16)) float8_e4m3fn).

    Blocks: nvfp4_real_block_scale; elements: x / fl(fp32(block scale) * global scale) (IEEE)
    rounded to E2M1, sign bit set when the quotient is < 0; packed two codes a byte.
    (refquant.compiled runs this step as a Triton kernel on CUDA, refquant.compiled.nvfp4_triton.)
    """
    blocks = to_blocks(x).float()
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)  # NaN propagates, as modelopt's
    block_scale = nvfp4_real_block_scale(block_amax, global_scale)
    divisor = block_scale.float() * global_scale
    u = blocks / divisor
    # Only reachable under a zero global scale (all-zero tensor): keep 0 / 0 from becoming NaN.
    u = torch.where((blocks == 0) & (divisor == 0), torch.zeros_like(u), u)
    codes = e2m1_magnitude_index(u.abs()) | ((u < 0).to(torch.uint8) << 3)
    return pack_e2m1_blocks(codes), block_scale.squeeze(-1)
