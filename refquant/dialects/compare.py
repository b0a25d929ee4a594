"""Which dialect an output agrees with, and at which step two computations of an element part
(NVFP4, FP8, and the MX formats).

Pure functions of tensors; refquant.testing.which_dialect formats them for people, and
scripts/make_dialect_table.py counts them for docs/dialects.md.

The steps, in the order they are checked (the first that applies names the element):
  "NaN input"            x is NaN: every stack has its own rule for it
  "zero block"           the block's max |x| is 0 (stacks give such blocks different scales)
  "block scale rounding" the blocks' scales (E4M3 times the global scale) differ
  "sign of zero"         both give a zero, of different signs
  "element tie"          same scale; the quotient sits exactly on an E2M1 decision point (one
                         side rounds the tie another way, or lands on it where the other does not)
  "reciprocal"           same scale; the quotients differ (a reciprocal then a multiply, an
                         approximate division, or an IEEE division) and round to different codes
  "dequantize rounding"  same codes and scales; the products rounded differently
MX (MX_STEPS) has the same steps, with the block's E8M0 scale byte for the block scale ("shared
exponent") and "element rounding" for a non-tie code difference (a clamp, a rounding done in a
narrower dtype, or a different divisor for the same byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics.formats import MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from ..numerics.nvfp4 import to_blocks
from .common import FP8Steps, NVFP4Steps
from .mx import MXSteps, e8m0_values, mx_element

STEPS = ("NaN input", "zero block", "block scale rounding", "sign of zero", "element tie", "reciprocal",
         "dequantize rounding")
FP8_STEPS = ("NaN input", "scale", "sign of zero", "element rounding", "dequantize rounding")
MX_STEPS = ("NaN input", "zero block", "shared exponent", "sign of zero", "element tie", "element rounding",
            "dequantize rounding")

# The integer dtype of each element size, to view a tensor's bit patterns.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of t as a signed/unsigned integer tensor of the same element size."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: the bit patterns of a and b (same dtype) differ, NaN == NaN whatever its payload
    (refquant.testing.assert_bitexact's comparison)."""
    differ = bits_of(a) != bits_of(b)
    if a.is_floating_point():  # the float8 dtypes too
        differ &= ~(torch.isnan(a.float()) & torch.isnan(b.float()))
    return differ


def decode_scale(steps: NVFP4Steps) -> torch.Tensor:
    """fp32 (..., nblocks, 1): what a code of the block is multiplied by, fl(E4M3 * g) or
    fl(E4M3 / G_enc); compared between stacks, so that two conventions that store the same scale
    do not count as a difference."""
    block = steps.block_scale.float().unsqueeze(-1)
    return block / steps.global_scale if steps.global_scale_encodes else block * steps.global_scale


def codes_differ(element: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: two code tensors (uint8) of the element format differ, any two FP8 NaN codes
    counting as equal."""
    fmt = mx_element(element)
    differ = a != b
    if fmt.dtype is not None:
        differ &= ~(torch.isnan(fmt.decode(a)) & torch.isnan(fmt.decode(b)))
    return differ


def is_zero_code(element: str, codes: torch.Tensor) -> torch.Tensor:
    return (codes & (mx_element(element).sign_bit - 1)) == 0


def on_decision_point(element: str, quotient: torch.Tensor) -> torch.Tensor:
    """|quotient| is a midpoint between two neighbouring magnitudes of the element format (for E2M1,
    refquant.numerics.formats.E2M1_DECISION_POINTS): a rounding there has a tie to break."""
    return torch.isin(quotient.abs(), mx_element(element).decision_points(quotient.device))


def magnitude_index(element: str, codes: torch.Tensor) -> torch.Tensor:
    """Index of each code's magnitude in the element format's magnitudes() (int64); NaN codes get -1."""
    fmt = mx_element(element)
    values = fmt.decode(codes).abs()
    index = torch.searchsorted(fmt.magnitudes(codes.device), values.contiguous())
    return torch.where(torch.isnan(values), -1, index)


def first_rule(rules: list, differ: torch.Tensor) -> torch.Tensor:
    """int64, differ's shape: the index of the first rule (a bool tensor) that holds, where differ
    holds; -1 elsewhere."""
    step = torch.full(differ.shape, -1, dtype=torch.int64, device=differ.device)
    for index in reversed(range(len(rules))):
        step = torch.where(rules[index], index, step)
    return torch.where(differ, step, -1)


def step_of_difference(x_blocks: torch.Tensor, a, b, differ: torch.Tensor, element: str,
                       scale_differs: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, block): for each element where `differ` holds, the index into STEPS
    (NVFP4) or MX_STEPS (MX) of the step where two blocked computations of it part; -1 elsewhere.

    a, b: NVFP4Steps or MXSteps of one element format `element` ("e2m1" for NVFP4).
    scale_differs: bool, differ's shape: the elements whose blocks' scales differ, as the format
    compares them (NVFP4: decode_scale's bits; MX: the E8M0 bytes).
    """
    code_differs = codes_differ(element, a.codes, b.codes)
    rules = [
        torch.isnan(x_blocks),
        (a.block_amax == 0).expand_as(differ) & (scale_differs | code_differs),
        scale_differs,
        is_zero_code(element, a.codes) & is_zero_code(element, b.codes),
        code_differs & (on_decision_point(element, a.quotient) | on_decision_point(element, b.quotient)),
        code_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def nvfp4_differences(x: torch.Tensor, a: NVFP4Steps, b: NVFP4Steps) -> tuple[torch.Tensor, torch.Tensor]:
    """(differ, step) in block layout (..., nblocks, 16): where the dequantized outputs of a and b
    differ in bits (NaN == NaN), and the index into STEPS where their computations part
    (step_of_difference)."""
    differ = bits_differ(to_blocks(a.dequantized, NVFP4_BLOCK_SIZE), to_blocks(b.dequantized, NVFP4_BLOCK_SIZE))
    scale_differs = bits_differ(decode_scale(a), decode_scale(b)).expand_as(differ)
    return differ, step_of_difference(to_blocks(x.float(), NVFP4_BLOCK_SIZE), a, b, differ, "e2m1", scale_differs)


@dataclass
class ObservedNVFP4:
    """A kernel's NVFP4 output as given to which_dialect: fake-quant values (x's shape and dtype),
    or codes with block scales."""

    dequantized: torch.Tensor | None = None
    codes: torch.Tensor | None = None  # uint8 (..., nblocks, 16)
    block_scale: torch.Tensor | None = None  # float8_e4m3fn (..., nblocks)


def observed_nvfp4_differ(observed: ObservedNVFP4, steps: NVFP4Steps) -> torch.Tensor:
    """bool (..., nblocks, 16): elements of `observed` that `steps` does not reproduce."""
    if observed.dequantized is not None:
        return bits_differ(to_blocks(observed.dequantized, NVFP4_BLOCK_SIZE),
                           to_blocks(steps.dequantized, NVFP4_BLOCK_SIZE))
    differ = observed.codes != steps.codes
    differ |= bits_differ(observed.block_scale, steps.block_scale).unsqueeze(-1)
    return differ


def observed_nvfp4_steps(x: torch.Tensor, observed: ObservedNVFP4, best: NVFP4Steps, differ: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, 16): for each element of `observed` that the `best` dialect does not
    reproduce, the index into STEPS of where they part, read from the output alone; -1 elsewhere
    (observed_step_of_difference)."""
    return observed_step_of_difference(x, observed, best, differ, "e2m1", NVFP4_BLOCK_SIZE, decode_scale(best),
                                       (observed.block_scale, best.block_scale))


def observed_step_of_difference(x: torch.Tensor, observed, best, differ: torch.Tensor, element: str, block: int,
                                best_decode_scale: torch.Tensor, stored_scales: tuple) -> torch.Tensor:
    """int64 (..., nblocks, block): for each element of `observed` (ObservedNVFP4 or ObservedMX)
    that the `best` dialect's computation (NVFP4Steps or MXSteps, element format `element`) does not
    reproduce, the index into STEPS / MX_STEPS of where they part, read from the output alone; -1
    elsewhere.

    best_decode_scale: fp32 (..., nblocks, 1), what best multiplies a code's value by in a block.
    stored_scales: (observed's, best's) stored block scales, compared in bits when `observed` holds
    codes. Fake-quant values: a block whose values are not element magnitudes times best's decode
    scale (rounded to the output's dtype) used another scale; else the magnitudes are compared.
    """
    if observed.dequantized is not None:
        output = to_blocks(observed.dequantized, block)
        # Which magnitude m, times best's decode scale and rounded to the output's dtype, gives |y|.
        magnitudes = mx_element(element).magnitudes(output.device)
        candidates = (magnitudes * best_decode_scale.unsqueeze(-1)).to(output.dtype).float()
        matches = candidates == output.float().abs().unsqueeze(-1)
        on_grid = matches.any(dim=-1)
        scale_differs = (~on_grid & ~torch.isnan(output.float())).any(dim=-1, keepdim=True).expand_as(differ)
        observed_magnitude = matches.to(torch.uint8).argmax(dim=-1)
        both_zero = (output.float() == 0) & (to_blocks(best.dequantized, block).float() == 0)
    else:
        scale_differs = bits_differ(*stored_scales).unsqueeze(-1).expand_as(differ)
        observed_magnitude = magnitude_index(element, observed.codes)
        both_zero = is_zero_code(element, observed.codes) & is_zero_code(element, best.codes)
    magnitude_differs = observed_magnitude != magnitude_index(element, best.codes)
    rules = [
        torch.isnan(to_blocks(x.float(), block)),
        (best.block_amax == 0).expand_as(differ),
        scale_differs,
        both_zero,
        magnitude_differs & on_decision_point(element, best.quotient),
        magnitude_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def fp8_step_of_difference(x: torch.Tensor, a: FP8Steps, b: FP8Steps, differ: torch.Tensor) -> torch.Tensor:
    """int64, x's shape: index into FP8_STEPS where two FP8 computations of an element part; -1
    elsewhere (never -1 where `differ` holds: the last step catches every element)."""
    scale_a = a.scale.float().expand_as(x)
    scale_b = b.scale.float().expand_as(x)
    data_differs = bits_differ(a.data, b.data)
    rules = [
        torch.isnan(x),
        bits_differ(scale_a, scale_b),
        (a.data.float() == 0) & (b.data.float() == 0),
        data_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def fp8_differences(x: torch.Tensor, a: FP8Steps, b: FP8Steps) -> tuple[torch.Tensor, torch.Tensor]:
    """(differ, step) over x's shape for two FP8 computations (dequantized or data differ)."""
    differ = bits_differ(a.dequantized, b.dequantized) | bits_differ(a.data, b.data)
    differ &= ~torch.isnan(x) | ~(torch.isnan(a.dequantized.float()) & torch.isnan(b.dequantized.float()))
    return differ, fp8_step_of_difference(x, a, b, differ)


# ------------------------------------------------------------------------------------------------
# MX
# ------------------------------------------------------------------------------------------------


def mx_differences(x: torch.Tensor, a: MXSteps, b: MXSteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(differ, step) in block layout (..., nblocks, 32): where the dequantized outputs of a and b
    differ in bits (NaN == NaN), and the index into MX_STEPS where their computations part
    (step_of_difference)."""
    if a.element != b.element:
        raise ValueError(f"MX computations of different element formats ({a.element}, {b.element}) do not compare.")
    differ = bits_differ(to_blocks(a.dequantized, MX_BLOCK_SIZE), to_blocks(b.dequantized, MX_BLOCK_SIZE))
    scale_differs = (a.scale != b.scale).unsqueeze(-1).expand_as(differ)
    return differ, step_of_difference(to_blocks(x.float(), MX_BLOCK_SIZE), a, b, differ, a.element, scale_differs)


@dataclass
class ObservedMX:
    """A kernel's MX output as given to which_dialect: fake-quant values (x's shape and dtype), or
    element codes (uint8 (..., nblocks, 32)) with their E8M0 scale bytes (uint8 (..., nblocks))."""

    element: str
    dequantized: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None


def observed_mx_differ(observed: ObservedMX, steps: MXSteps) -> torch.Tensor:
    """bool (..., nblocks, 32): elements of `observed` that `steps` does not reproduce."""
    if observed.dequantized is not None:
        return bits_differ(to_blocks(observed.dequantized, MX_BLOCK_SIZE), to_blocks(steps.dequantized, MX_BLOCK_SIZE))
    differ = codes_differ(observed.element, observed.codes, steps.codes)
    return differ | (observed.scale != steps.scale).unsqueeze(-1)


def observed_mx_steps(x: torch.Tensor, observed: ObservedMX, best: MXSteps, differ: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, 32): for each element of `observed` that the `best` dialect does not
    reproduce, the index into MX_STEPS of where they part, read from the output alone; -1 elsewhere
    (observed_step_of_difference; the scale bytes are best's decode scale)."""
    return observed_step_of_difference(x, observed, best, differ, best.element, MX_BLOCK_SIZE,
                                       e8m0_values(best.scale).unsqueeze(-1), (observed.scale, best.scale))


__all__ = ["FP8_STEPS", "MX_STEPS", "ObservedMX", "ObservedNVFP4", "STEPS", "bits_differ", "bits_of", "decode_scale",
           "fp8_differences", "mx_differences", "nvfp4_differences", "observed_mx_differ", "observed_mx_steps",
           "observed_nvfp4_differ", "observed_nvfp4_steps"]
