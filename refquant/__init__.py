"""refquant: a bit-exact, readable PyTorch reference for modelopt's FP8 and NVFP4 quantization.

The numerics are pure functions of tensors (refquant.numerics.fp8, refquant.numerics.nvfp4); CPU
eager is the golden reference, and every function gives the same bits on CPU and CUDA.

The packages are layers, each importing only those below it (tests/test_layering.py):
  numerics/   the formats and the math: fake quant, real quant, dequant
  compiled/   the same functions through torch.compile, beside the numerics (rq.compiled,
              imported on first use: it loads torch._dynamo and inductor)
  quant/      the quantizer module, its backends, and TOML recipes
  hf/         transformers: quantizers in linears and attention, PTQ, checkpoint export and load
  cli/        python3 -m refquant {quantize,recipes,demo}
"""

from . import testing
from ._version import __version__  # noqa: F401 (public; not in __all__, as before)
from .numerics import formats
from .numerics.fp8 import FP8Tensor, fp8_fake_quant, fp8_quantize
from .numerics.nvfp4 import NVFP4Tensor, nvfp4_fake_quant, nvfp4_quantize
from .quant.quantizer import QuantizerConfig, TensorQuantizer
from .quant.recipe import QuantRule, Recipe, apply_recipe, load_recipe, select_recipe
from .hf.insert import insert_quantizers
from .hf.ptq import quantize_model
from .hf.fold import fold_weights
from .hf.report import PTQReport
from .hf.export import compress_weights, export_checkpoint, load_checkpoint

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
    "fold_weights",
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


def __getattr__(name: str):
    # refquant.compiled costs seconds to import (torch._dynamo, inductor); `import refquant` stays
    # fast, and `rq.compiled` imports it on first use.
    if name == "compiled":
        import importlib

        return importlib.import_module(f"{__name__}.compiled")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "compiled"})
