"""Which dialect an output agrees with, and at which step two computations of an element part.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics.formats import E2M1_DECISION_POINTS
from .common import FP8Steps, NVFP4Steps

STEPS = ("NaN input", "zero block", "block scale rounding", "sign of zero", "element tie", "reciprocal",
         "dequantize rounding")
FP8_STEPS = ("NaN input", "scale", "sign of zero", "element rounding", "dequantize rounding")


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


def _blocked(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, (-t.shape[-1]) % 16)).unflatten(-1, (-1, 16))


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


__all__ = ["FP8_STEPS", "ObservedNVFP4", "STEPS", "bits_differ", "decode_scale", "fp8_differences",
           "nvfp4_differences", "observed_nvfp4_differ", "observed_nvfp4_steps"]
