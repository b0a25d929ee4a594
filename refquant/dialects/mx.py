"""What every stack's OCP MX formats have in common: the element formats (E4M3, E5M2, E2M1) with
their grids and codes, the E8M0 scale byte, blocks of 32, and the MXSteps record each MX dialect
fills.

An MX tensor (OCP Microscaling Formats spec v1.0) holds elements in blocks of 32 along one dim and
one E8M0 scale per block: a power of two 2**(b - 127) stored as its biased exponent b, 0xFF NaN.
The spec chooses the scale as 2**(floor(log2(max|block|)) - emax), emax the exponent of the
element format's largest power of two; stacks also use the ceiling of log2(max|block| / max) and
round the elements their own way. Each dialect module says which, in its stack's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics.formats import (
    E2M1_EMAX,
    E2M1_MAX,
    E2M1_SIGN_BIT,
    E4M3_DTYPE,
    E4M3_EMAX,
    E4M3_MAX,
    E5M2_DTYPE,
    E5M2_EMAX,
    E5M2_MAX,
    E8M0_DTYPE,
    MX_BLOCK_SIZE,
)
from ..numerics.nvfp4 import pack_e2m1, to_blocks, unpack_e2m1
from .common import e2m1_codes_nearest_even, e2m1_values, require_block_multiple

__all__ = ["MX_ELEMENTS", "MX_FORMATS", "MXElement", "MXSteps", "e8m0_values", "mx_blocks", "mx_element", "unblock"]


@dataclass(frozen=True)
class MXElement:
    """An MX element format.

    name:          "e4m3", "e5m2" or "e2m1".
    max:           largest finite magnitude (448, 57344, 6).
    emax:          exponent of its largest power of two (8, 15, 2): the OCP scale's offset.
    mantissa_bits: stored mantissa bits (3, 2, 1).
    min_exponent:  exponent of its smallest normal value (-6, -14, 0); below it, subnormals.
    dtype:         the torch dtype that holds an element (float8_e4m3fn, float8_e5m2), None for
                   E2M1, whose codes are 4-bit integers (bit 3 the sign), two a byte.
    """

    name: str
    max: float
    emax: int
    mantissa_bits: int
    min_exponent: int
    dtype: torch.dtype | None

    @property
    def sign_bit(self) -> int:
        return E2M1_SIGN_BIT if self.dtype is None else 0x80

    def magnitudes(self, device=None) -> torch.Tensor:
        """fp32, ascending: every finite non-negative value of the format."""
        if self.dtype is None:
            return e2m1_values(torch.arange(8, dtype=torch.uint8, device=device))
        values = torch.arange(128, dtype=torch.int32, device=device).to(torch.uint8).view(self.dtype).float()
        return values[torch.isfinite(values)]

    def decision_points(self, device=None) -> torch.Tensor:
        """fp32: the midpoints between neighbouring magnitudes, where a rounding has a tie to break."""
        grid = self.magnitudes(device)
        return (grid[:-1] + grid[1:]) / 2

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """uint8 codes of values on the format's grid (exact), the sign bit copied from each value's
        own (so -0.0 gets the negative-zero code). Off-grid values round to nearest even; NaN gets
        the FP8 NaN bits, or E2M1 magnitude 7."""
        if self.dtype is None:
            return e2m1_codes_nearest_even(values.float(), torch.signbit(values))
        return values.float().to(self.dtype).view(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """fp32 value of each uint8 code (the negative-zero code decodes to -0.0)."""
        if self.dtype is None:
            return e2m1_values(codes, negative_zero=True)
        return codes.view(self.dtype).float()

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., n) codes as a stack stores them: E2M1 two a byte (element 2j in the low nibble,
        every stack here), FP8 viewed as its dtype."""
        return pack_e2m1(codes) if self.dtype is None else codes.view(self.dtype)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of pack: (..., n) uint8 codes."""
        return unpack_e2m1(stored) if self.dtype is None else stored.view(torch.uint8)


MX_ELEMENTS = {
    "e4m3": MXElement("e4m3", E4M3_MAX, E4M3_EMAX, 3, -6, E4M3_DTYPE),
    "e5m2": MXElement("e5m2", E5M2_MAX, E5M2_EMAX, 2, -14, E5M2_DTYPE),
    "e2m1": MXElement("e2m1", E2M1_MAX, E2M1_EMAX, 1, 0, None),
}
# The MX formats by the spec's names, and their element formats.
MX_FORMATS = {"mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp4": "e2m1"}


def mx_element(element: str) -> MXElement:
    if element not in MX_ELEMENTS:
        raise ValueError(f"{element!r} is not an MX element format; use one of {', '.join(MX_ELEMENTS)}.")
    return MX_ELEMENTS[element]


@dataclass
class MXSteps:
    """One stack's MX quantization of a tensor, step by step.

    Block layout: (..., n) is seen as (..., n / 32, 32) blocks along the last dim (zero-padded
    where the stack pads; a dialect with an axis argument moves that axis last first).

    dialect:      the dialect's name (refquant.dialects.MX_DIALECTS).
    element:      the element format's name ("e4m3", "e5m2", "e2m1").
    block_amax:   fp32 (..., nblocks, 1): the max |x| the stack took each block's scale from.
    scale:        uint8 (..., nblocks): the E8M0 byte stored (biased exponent; 0xFF is NaN).
    quotient:     fp32 (..., nblocks, 32): the value the stack rounds to the element format
                  (x over its power-of-two scale, before any clamp to +-max).
    codes:        uint8 (..., nblocks, 32): E2M1 codes (bit 3 the sign) or the FP8 element's bits.
    dequantized:  x's dtype and shape: the stack's dequantize of these codes and scales (its fake
                  quant, where it has one).
    length:       n, the blocked dim's length before padding.
    """

    dialect: str
    element: str
    block_amax: torch.Tensor
    scale: torch.Tensor
    quotient: torch.Tensor
    codes: torch.Tensor
    dequantized: torch.Tensor
    length: int

    @property
    def stored(self) -> torch.Tensor:
        """The elements as the stack stores them, padding dropped: E2M1 packed two a byte (uint8,
        (..., n / 2)), FP8 as float8_e4m3fn / float8_e5m2 (..., n)."""
        return mx_element(self.element).pack(unblock(self.codes, self.length))

    @property
    def scale_e8m0(self) -> torch.Tensor:
        """The scale bytes as torch.float8_e8m0fnu."""
        return self.scale.view(E8M0_DTYPE)


def e8m0_values(scale: torch.Tensor) -> torch.Tensor:
    """fp32 value of each E8M0 byte (uint8 or float8_e8m0fnu): 2**(b - 127), NaN for 0xFF."""
    return scale.view(torch.uint8).view(E8M0_DTYPE).float()


def mx_blocks(x: torch.Tensor, stack: str, *, pads: bool) -> torch.Tensor:
    """x (..., n) as (..., n / 32, 32) blocks in x's dtype. A stack that pads takes any n and pads
    with zeros; one that does not refuses an n that is not a multiple of 32, and so do we."""
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{stack} quantizes MX in blocks of {MX_BLOCK_SIZE} along the last dim; x has shape "
                         f"{tuple(x.shape)}.")
    if not pads:
        require_block_multiple(x, stack, "MX", MX_BLOCK_SIZE)
    return to_blocks(x, MX_BLOCK_SIZE)


def unblock(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """(..., nblocks, 32) -> (..., n): the blocks flattened, padding dropped."""
    return blocks.flatten(-2)[..., :n]
