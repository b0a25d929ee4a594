"""The numerics: FP8 E4M3 and NVFP4 fake quant, real quant and dequant as pure functions of tensors.

  formats.py   named limits and code tables of E4M3 and E2M1
  fp8.py       FP8 E4M3 fake and real quantization
  nvfp4.py     NVFP4 fake and real quantization
  checks.py    input validation and amax handling shared by both
  straight_through.py  fake quant's gradient: modelopt's straight-through estimator

The bottom layer: it imports nothing else of refquant. This package is also the "reference"
backend of a quantizer (refquant.quant.backends), beside refquant.compiled.
"""

from . import formats
from .fp8 import FP8Tensor, fp8_fake_quant, fp8_quantize
from .nvfp4 import NVFP4Tensor, nvfp4_fake_quant, nvfp4_quantize

__all__ = [
    "FP8Tensor",
    "NVFP4Tensor",
    "formats",
    "fp8_fake_quant",
    "fp8_quantize",
    "nvfp4_fake_quant",
    "nvfp4_quantize",
]
