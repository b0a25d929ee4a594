"""The inductor settings under which torch.compile gives the reference's bits (docs/compiled.md).

They are passed as torch.compile(options=...), so they apply to refquant's compiled functions
only: no global inductor setting is changed.
"""

from __future__ import annotations

import inspect

import torch
import torch._inductor.config as inductor_config


def division_rounding_option() -> str:
    """The name of inductor's "divide like eager" switch in the installed torch.

    Without it a float32 `a / b` (and torch.reciprocal, lowered as 1 / b) becomes Triton's `/`,
    the approximate div.full.f32 (up to 2 ulp off); with it, div_rn (IEEE). torch 2.13 files it
    under eager_numerics; older releases spell it emulate_divison_rounding (sic).
    """
    if hasattr(inductor_config, "eager_numerics") and hasattr(inductor_config.eager_numerics, "division_rounding"):
        return "eager_numerics.division_rounding"
    return "emulate_divison_rounding"


# NVFP4: a long elementwise chain (the E2M1 rounding, the packing) belongs in the kernel that reduces
# the blocks; inductor's default of 30 cut it into a kernel of its own with a uint8 buffer between.
REALIZE_OPCOUNT_THRESHOLD = 200
# FP8: the per-tensor scales (a reciprocal of the amax, a product, a second reciprocal) are 0-d
# values broadcast over x; inlined, each thread of the big kernel recomputes them (two IEEE
# divisions). With a low threshold they are computed once, in a one-element kernel. On the H100
# the FP8 kernel runs at the copy's time with it (0.179 ms at 8192 x 16384); its effect alone was
# not measured there: the 0.26 ms it was first blamed for came from the symbolic last dim.
FP8_REALIZE_OPCOUNT_THRESHOLD = 1


def inductor_options(realize_opcount_threshold: int = REALIZE_OPCOUNT_THRESHOLD) -> dict[str, bool | int]:
    """Options for torch.compile(..., options=...) that keep every rounding step of the reference.

    - division rounding: IEEE division and reciprocal (see division_rounding_option).
    - emulate_precision_casts: keep each written `.to(bfloat16 / float16)` rounding inside a fused
      kernel (inductor otherwise elides a downcast followed by an upcast: FP8QTensor's two
      roundings of x / scale collapse into one), and turn off Triton's mul+add -> fma contraction.
    - realize_opcount_threshold (speed, not bits): a pointwise value used more than once, or
      broadcast, whose computation has more ops than this is computed once into a buffer instead
      of being recomputed by each consumer. Inductor's default is 30; see the two values above.
    """
    options: dict[str, bool | int] = {division_rounding_option(): True, "emulate_precision_casts": True}
    if hasattr(inductor_config, "realize_opcount_threshold"):
        options["realize_opcount_threshold"] = realize_opcount_threshold
    return options


# dynamo keeps at most `recompile_limit` graphs per function (8 by default). One reference function
# legitimately needs more (3 dtypes x 2 flavors x amax given / computed / per channel). torch >= 2.13
# takes the limit per compiled function (checked only when a new graph is compiled, so calls cost
# nothing extra); with older releases a call that hits the global limit is retried with the global
# limit raised for that one call (refquant.compiled.functions._run).
RECOMPILE_LIMIT = 64
LIMIT_PER_FUNCTION = "recompile_limit" in inspect.signature(torch.compile).parameters


def compile_reference(fn, realize_opcount_threshold: int = REALIZE_OPCOUNT_THRESHOLD):
    """torch.compile(fn) as refquant.compiled runs it: one graph (fullgraph), sizes made dynamic by
    the caller's marks, our inductor options, and our recompile limit where torch takes one."""
    kwargs = {"fullgraph": True, "dynamic": None, "options": inductor_options(realize_opcount_threshold)}
    if LIMIT_PER_FUNCTION:
        kwargs["recompile_limit"] = RECOMPILE_LIMIT
    return torch.compile(fn, **kwargs)


def recompile_limit_patch():
    """For torch without per-function limits: the global limit raised while the block runs."""
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
