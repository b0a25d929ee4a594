"""refquant: a bit-exact, readable PyTorch reference for modelopt's FP8 and NVFP4 quantization.

The numerics are pure functions of tensors (refquant.fp8, refquant.nvfp4); CPU eager is the
golden reference, and every function gives the same bits on CPU and CUDA.
"""

from . import formats, testing
from .fp8 import FP8Tensor, fp8_fake_quant, fp8_quantize
from .nvfp4 import NVFP4Tensor, nvfp4_fake_quant, nvfp4_quantize
from .quantizer import QuantizerConfig, TensorQuantizer
from .ptq import PTQReport, insert_quantizers, quantize_model
from .recipe import QuantRule, Recipe, apply_recipe, load_recipe, select_recipe
from .export import compress_weights, export_checkpoint, load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "FP8Tensor",
    "NVFP4Tensor",
    "PTQReport",
    "QuantRule",
    "QuantizerConfig",
    "Recipe",
    "TensorQuantizer",
    "apply_recipe",
    "compress_weights",
    "export_checkpoint",
    "formats",
    "fp8_fake_quant",
    "fp8_quantize",
    "insert_quantizers",
    "load_checkpoint",
    "load_recipe",
    "nvfp4_fake_quant",
    "nvfp4_quantize",
    "quantize_model",
    "select_recipe",
    "testing",
]
