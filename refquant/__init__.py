"""refquant: a bit-exact, readable PyTorch reference for modelopt's FP8 and NVFP4 quantization.

The numerics are pure functions of tensors (refquant.fp8, refquant.nvfp4); CPU eager is the
golden reference, and every function gives the same bits on CPU and CUDA.
"""

from . import formats, testing
from .fp8 import FP8Tensor, fp8_fake_quant, fp8_quantize
from .nvfp4 import NVFP4Tensor, nvfp4_fake_quant, nvfp4_quantize

__version__ = "0.1.0"

__all__ = [
    "FP8Tensor",
    "NVFP4Tensor",
    "formats",
    "fp8_fake_quant",
    "fp8_quantize",
    "nvfp4_fake_quant",
    "nvfp4_quantize",
    "testing",
]
