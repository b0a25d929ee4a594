"""refquant.compiled: the reference numerics lowered through torch.compile (inductor).

The same functions as refquant (fp8_fake_quant, fp8_quantize, nvfp4_fake_quant, nvfp4_quantize,
and the dequantize of their results), with the same signatures and the same bits on CPU (C++)
and CUDA (Triton). Each one is torch.compile applied to the reference function itself, under the
inductor options in refquant.compiled.options, scoped to these calls. Two exceptions: on CUDA,
NVFP4 real and fake quant's per-block steps are the Triton kernels of
refquant.compiled.nvfp4_triton and refquant.compiled.nvfp4_fake_triton (imported only then), held
to the reference bit for bit by the CUDA tests. docs/compiled.md has the design. The private
torch and Triton APIs the fast kernel launch uses, the versions it was tested on and the switch
that turns it off (REFQUANT_FAST_LAUNCH) are in refquant.compiled.private_api.
"""

from .functions import (FP8Tensor, NVFP4Tensor, bind_fake_quant, bind_slice_fake_quant, fp8_fake_quant, fp8_quantize,
                        nvfp4_fake_quant, nvfp4_quantize)
from .options import inductor_options
from .private_api import RefquantFastLaunchMismatch, RefquantFastLaunchWarning

__all__ = [
    "FP8Tensor",
    "NVFP4Tensor",
    "RefquantFastLaunchMismatch",
    "RefquantFastLaunchWarning",
    "bind_fake_quant",
    "bind_slice_fake_quant",
    "fp8_fake_quant",
    "fp8_quantize",
    "inductor_options",
    "nvfp4_fake_quant",
    "nvfp4_quantize",
]
