"""The inductor settings under which torch.compile gives the reference's bits (docs/compiled.md).

They are passed as torch.compile(options=...), so they apply to refquant's compiled functions
only: no global inductor setting is changed.
"""

from __future__ import annotations

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


def inductor_options() -> dict[str, bool]:
    """Options for torch.compile(..., options=...) that keep every rounding step of the reference.

    - division rounding: IEEE division and reciprocal (see division_rounding_option).
    - emulate_precision_casts: keep each written `.to(bfloat16 / float16)` rounding inside a fused
      kernel (inductor otherwise elides a downcast followed by an upcast: FP8QTensor's two
      roundings of x / scale collapse into one), and turn off Triton's mul+add -> fma contraction.
    - realize_opcount_threshold: see below.
    """
    options = {division_rounding_option(): True, "emulate_precision_casts": True}
    if hasattr(inductor_config, "realize_opcount_threshold"):
        # Speed, not bits: inductor cuts a pointwise chain of more than 30 ops into its own kernel
        # and buffer; the E2M1 ladder of NVFP4 real quant is longer, and belongs in one kernel.
        options["realize_opcount_threshold"] = REALIZE_OPCOUNT_THRESHOLD
    return options


REALIZE_OPCOUNT_THRESHOLD = 200


COMPILE_KWARGS = {"fullgraph": True, "dynamic": None, "options": inductor_options()}

# dynamo keeps at most `recompile_limit` graphs per function (8 by default) and silently runs the
# rest eagerly. One reference function legitimately needs more (3 dtypes x 2 flavors x amax
# given / computed / per channel), so our calls raise the limit while they run, and only then.
RECOMPILE_LIMIT = 64


def recompile_limit_patch():
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
