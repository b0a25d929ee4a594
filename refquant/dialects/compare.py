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

from ..numerics.formats import E2M1_DECISION_POINTS
from .common import FP8Steps, NVFP4Steps
from .mx import MXSteps, e8m0_values, mx_element

STEPS = ("NaN input", "zero block", "block scale rounding", "sign of zero", "element tie", "reciprocal",
         "dequantize rounding")
FP8_STEPS = ("NaN input", "scale", "sign of zero", "element rounding", "dequantize rounding")
MX_STEPS = ("NaN input", "zero block", "shared exponent", "sign of zero", "element tie", "element rounding",
            "dequantize rounding")


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: the bit patterns differ, NaN == NaN whatever its payload (as assert_bitexact)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    differ = a.contiguous().view(view) != b.contiguous().view(view)
    if a.is_floating_point() or a.dtype == torch.float8_e4m3fn:
        differ &= ~(torch.isnan(a.float()) & torch.isnan(b.float()))
    return differ


def decode_scale(steps: NVFP4Steps) -> torch.Tensor:
    """fp32 (..., nblocks, 1): what a code of the block is multiplied by, fl(E4M3 * g) or
    fl(E4M3 / G_enc); compared between stacks, so that two conventions that store the same scale
    do not count as a difference."""
    block = steps.block_scale.float().unsqueeze(-1)
    return block / steps.global_scale if steps.global_scale_encodes else block * steps.global_scale


def on_decision_point(quotient: torch.Tensor) -> torch.Tensor:
    points = torch.tensor(E2M1_DECISION_POINTS, dtype=torch.float32, device=quotient.device)
    return (quotient.abs().unsqueeze(-1) == points).any(dim=-1)


def first_rule(rules: list, differ: torch.Tensor) -> torch.Tensor:
    """int64, differ's shape: the index of the first rule (a bool tensor) that holds, where differ
    holds; -1 elsewhere."""
    step = torch.full(differ.shape, -1, dtype=torch.int64, device=differ.device)
    for index in reversed(range(len(rules))):
        step = torch.where(rules[index], index, step)
    return torch.where(differ, step, -1)


def nvfp4_step_of_difference(x_blocks: torch.Tensor, a: NVFP4Steps, b: NVFP4Steps, differ: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, 16): for each element where `differ` holds, the index into STEPS of the
    step where the computations `a` and `b` of it part; -1 elsewhere."""
    zero_code_a, zero_code_b = (a.codes & 7) == 0, (b.codes & 7) == 0
    scale_differs = bits_differ(decode_scale(a), decode_scale(b)).expand_as(differ)
    code_differs = a.codes != b.codes
    rules = [
        torch.isnan(x_blocks),
        (a.block_amax == 0).expand_as(differ) & (scale_differs | code_differs),
        scale_differs,
        zero_code_a & zero_code_b,
        code_differs & (on_decision_point(a.quotient) | on_decision_point(b.quotient)),
        code_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def nvfp4_differences(x: torch.Tensor, a: NVFP4Steps, b: NVFP4Steps) -> tuple[torch.Tensor, torch.Tensor]:
    """(differ, step) in block layout (..., nblocks, 16): where the dequantized outputs of a and b
    differ in bits (NaN == NaN), and the step where their computations part (nvfp4_step_of_difference)."""
    x_blocks = _blocked(x.float())
    differ = bits_differ(_blocked(a.dequantized), _blocked(b.dequantized))
    return differ, nvfp4_step_of_difference(x_blocks, a, b, differ)


def _blocked(t: torch.Tensor, block: int = 16) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, (-t.shape[-1]) % block)).unflatten(-1, (-1, block))


@dataclass
class ObservedNVFP4:
    """A kernel's NVFP4 output as given to which_dialect: fake-quant values (x's shape and dtype),
    or codes with block scales (and the stored global scale, if known)."""

    dequantized: torch.Tensor | None = None
    codes: torch.Tensor | None = None  # uint8 (..., nblocks, 16)
    block_scale: torch.Tensor | None = None  # float8_e4m3fn (..., nblocks)
    global_scale: torch.Tensor | None = None


def observed_nvfp4_differ(observed: ObservedNVFP4, steps: NVFP4Steps) -> torch.Tensor:
    """bool (..., nblocks, 16): elements of `observed` that `steps` does not reproduce."""
    if observed.dequantized is not None:
        return bits_differ(_blocked(observed.dequantized), _blocked(steps.dequantized))
    differ = observed.codes != steps.codes
    differ |= bits_differ(observed.block_scale, steps.block_scale).unsqueeze(-1)
    return differ


def observed_nvfp4_steps(x: torch.Tensor, observed: ObservedNVFP4, best: NVFP4Steps, differ: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, 16): for each element of `observed` that the `best` dialect does not
    reproduce, the index into STEPS of where they part, read from the output alone; -1 elsewhere.

    Fake-quant values: a block whose values are not whole E2M1 multiples of best's decode scale
    used another scale ("block scale rounding"); else the codes are compared as for codes.
    """
    x_blocks = _blocked(x.float())
    scale = decode_scale(best)
    if observed.dequantized is not None:
        output = _blocked(observed.dequantized)
        # Which E2M1 magnitude m, times best's decode scale and rounded to the output's dtype, gives |y|.
        magnitudes = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), device=output.device)
        candidates = (magnitudes * scale.unsqueeze(-1)).to(output.dtype).float()
        matches = candidates == output.float().abs().unsqueeze(-1)
        on_grid = matches.any(dim=-1)
        block_off_grid = (~on_grid & ~torch.isnan(output.float())).any(dim=-1, keepdim=True).expand_as(differ)
        codes = matches.to(torch.uint8).argmax(dim=-1).to(torch.uint8)
        both_zero = (output.float() == 0) & (_blocked(best.dequantized).float() == 0)
        scale_differs = block_off_grid
    else:
        codes = observed.codes
        both_zero = ((codes & 7) == 0) & ((best.codes & 7) == 0)
        scale_differs = bits_differ(observed.block_scale, best.block_scale).unsqueeze(-1).expand_as(differ)
    code_differs = (codes & 7) != (best.codes & 7)
    rules = [
        torch.isnan(x_blocks),
        (best.block_amax == 0).expand_as(differ),
        scale_differs,
        both_zero,
        code_differs & on_decision_point(best.quotient),
        code_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def fp8_step_of_difference(x: torch.Tensor, a: FP8Steps, b: FP8Steps, differ: torch.Tensor) -> torch.Tensor:
    """int64, x's shape: index into FP8_STEPS where two FP8 computations of an element part; -1 elsewhere."""
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

MX_BLOCK = 32


def mx_codes_differ(element: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: two code tensors (uint8) differ, any two FP8 NaN codes counting as equal."""
    differ = a != b
    if mx_element(element).dtype is not None:
        differ &= ~(torch.isnan(mx_element(element).decode(a)) & torch.isnan(mx_element(element).decode(b)))
    return differ


def is_zero_code(element: str, codes: torch.Tensor) -> torch.Tensor:
    return (codes & (mx_element(element).sign_bit - 1)) == 0


def on_mx_decision_point(element: str, quotient: torch.Tensor) -> torch.Tensor:
    """|quotient| is a midpoint between two neighbouring magnitudes of the element format."""
    points = mx_element(element).decision_points(quotient.device)
    return torch.isin(quotient.abs(), points)


def mx_step_of_difference(x_blocks: torch.Tensor, a: MXSteps, b: MXSteps, differ: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, 32): for each element where `differ` holds, the index into MX_STEPS of
    the step where the MX computations `a` and `b` (one element format) part; -1 elsewhere."""
    scale_differs = (a.scale != b.scale).unsqueeze(-1).expand_as(differ)
    code_differs = mx_codes_differ(a.element, a.codes, b.codes)
    rules = [
        torch.isnan(x_blocks),
        (a.block_amax == 0).expand_as(differ) & (scale_differs | code_differs),
        scale_differs,
        is_zero_code(a.element, a.codes) & is_zero_code(b.element, b.codes),
        code_differs & (on_mx_decision_point(a.element, a.quotient) | on_mx_decision_point(b.element, b.quotient)),
        code_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def mx_differences(x: torch.Tensor, a: MXSteps, b: MXSteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(differ, step) in block layout (..., nblocks, 32): where the dequantized outputs of a and b
    differ in bits (NaN == NaN), and the step where their computations part (mx_step_of_difference)."""
    if a.element != b.element:
        raise ValueError(f"MX computations of different element formats ({a.element}, {b.element}) do not compare.")
    differ = bits_differ(_blocked(a.dequantized, MX_BLOCK), _blocked(b.dequantized, MX_BLOCK))
    return differ, mx_step_of_difference(_blocked(x.float(), MX_BLOCK), a, b, differ)


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
        return bits_differ(_blocked(observed.dequantized, MX_BLOCK), _blocked(steps.dequantized, MX_BLOCK))
    differ = mx_codes_differ(observed.element, observed.codes, steps.codes)
    return differ | (observed.scale != steps.scale).unsqueeze(-1)


def observed_mx_steps(x: torch.Tensor, observed: ObservedMX, best: MXSteps, differ: torch.Tensor) -> torch.Tensor:
    """int64 (..., nblocks, 32): for each element of `observed` that the `best` dialect does not
    reproduce, the index into MX_STEPS of where they part, read from the output alone; -1 elsewhere.

    Fake-quant values: a block whose values are not element magnitudes times best's scale (rounded
    to the output's dtype) used another scale ("shared exponent"); else codes are compared.
    """
    element = mx_element(best.element)
    x_blocks = _blocked(x.float(), MX_BLOCK)
    if observed.dequantized is not None:
        output = _blocked(observed.dequantized, MX_BLOCK)
        scale = e8m0_values(best.scale).unsqueeze(-1)
        candidates = (element.magnitudes(output.device) * scale.unsqueeze(-1)).to(output.dtype).float()
        matches = candidates == output.float().abs().unsqueeze(-1)
        on_grid = matches.any(dim=-1)
        scale_differs = (~on_grid & ~torch.isnan(output.float())).any(dim=-1, keepdim=True).expand_as(differ)
        magnitude_differs = matches.to(torch.uint8).argmax(dim=-1) != _magnitude_index(element, best.codes)
        both_zero = (output.float() == 0) & (_blocked(best.dequantized, MX_BLOCK).float() == 0)
    else:
        scale_differs = (observed.scale != best.scale).unsqueeze(-1).expand_as(differ)
        magnitude_differs = _magnitude_index(element, observed.codes) != _magnitude_index(element, best.codes)
        both_zero = is_zero_code(best.element, observed.codes) & is_zero_code(best.element, best.codes)
    rules = [
        torch.isnan(x_blocks),
        (best.block_amax == 0).expand_as(differ),
        scale_differs,
        both_zero,
        magnitude_differs & on_mx_decision_point(best.element, best.quotient),
        magnitude_differs,
        torch.ones_like(differ),
    ]
    return first_rule(rules, differ)


def _magnitude_index(element, codes: torch.Tensor) -> torch.Tensor:
    """Index of each code's magnitude in element.magnitudes() (int64); NaN codes get -1."""
    values = element.decode(codes).abs()
    grid = element.magnitudes(codes.device)
    index = torch.searchsorted(grid, values.contiguous())
    return torch.where(torch.isnan(values), -1, index)


__all__ = ["FP8_STEPS", "MX_STEPS", "ObservedMX", "ObservedNVFP4", "STEPS", "bits_differ", "decode_scale",
           "fp8_differences", "mx_differences", "nvfp4_differences", "observed_mx_differ", "observed_mx_steps",
           "observed_nvfp4_differ", "observed_nvfp4_steps"]
