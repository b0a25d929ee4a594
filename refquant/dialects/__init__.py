"""Dialects: NVFP4 and FP8 as each stack computes them, bit for bit, as pure functions of tensors.

Every stack orders its float operations, reciprocals and edge cases its own way, so their bits
differ; each module here follows one stack's source, step by step, and returns an NVFP4Steps /
FP8Steps record (refquant.dialects.common) of what it computed: global and block scales, the
quotient it rounds, the codes, and its dequantized (fake-quant) values.

  modelopt.py            modelopt 0.47: refquant.numerics itself (kernel fake quant; NVFP4QTensor)
  torchao.py             torchao 0.18, prototype/mx_formats NVFP4 and Float8Tensor (PyTorch paths)
  compressed_tensors.py  compressed-tensors 0.19 / 0.20 with llm-compressor 0.14's observers
  transformer_engine.py  TransformerEngine 2.20's PyTorch reference (NVFP4, FP8 current scaling)
  trtllm.py              TensorRT-LLM's routine as FlashInfer 0.7.2 ships it (fast math), from source
  vllm_emulation.py      vLLM's NVFP4 emulation (CPU path), from source
  layouts.py             the swizzled 128x4 scale layout, to and from linear
  compare.py             which dialect an output agrees with, and where the others part from it

docs/dialects.md has the table of how each was verified and where they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import compressed_tensors, modelopt, torchao, transformer_engine, trtllm, vllm_emulation
from .common import FP8Steps, NVFP4Steps
from .layouts import from_swizzled, to_swizzled


@dataclass(frozen=True)
class Dialect:
    """One stack's NVFP4 or FP8 quantization: `steps(x, amax)` returns its NVFP4Steps / FP8Steps.

    source:   the stack, its version and the file the module follows.
    verified: how refquant knows it computes the stack's bits ("vectors" when tests/vectors holds
              the stack's own outputs and CI compares them bit for bit, else "from source").
    """

    name: str
    format: str  # "nvfp4" or "fp8"
    steps: Callable
    source: str
    verified: str


NVFP4_DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        Dialect("modelopt-kernel", "nvfp4", modelopt.nvfp4_kernel_steps,
                "modelopt 0.47, Triton fp4_fake_quant_block", "vectors"),
        Dialect("modelopt-qtensor", "nvfp4", modelopt.nvfp4_qtensor_steps,
                "modelopt 0.47, NVFP4QTensor", "vectors"),
        Dialect("torchao", "nvfp4", torchao.nvfp4_steps,
                "torchao 0.18.0, prototype/mx_formats/nvfp4_tensor.py", "vectors"),
        Dialect("compressed-tensors", "nvfp4", compressed_tensors.nvfp4_steps,
                "compressed-tensors 0.19.0 / 0.20.0 + llmcompressor 0.14.0.1", "vectors"),
        Dialect("transformer-engine", "nvfp4", transformer_engine.nvfp4_steps,
                "transformer_engine 2.20.2, pytorch/custom_recipes/reference_nvfp4.py", "vectors"),
        Dialect("trtllm", "nvfp4", trtllm.nvfp4_steps,
                "flashinfer-python 0.7.2.post1, tensorrt_llm/kernels/quantization_utils.cuh", "from source"),
        Dialect("vllm-emulation", "nvfp4", vllm_emulation.nvfp4_steps,
                "vllm, model_executor/layers/quantization/utils/nvfp4_emulation_utils.py", "from source"),
    )
}

FP8_DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        Dialect("modelopt", "fp8", modelopt.fp8_steps, "modelopt 0.47, TensorQuantizer (CPU)", "vectors"),
        Dialect("modelopt-cuda", "fp8", modelopt.fp8_cuda_steps, "modelopt 0.47, TensorQuantizer (CUDA extension)",
                "vectors"),
        Dialect("modelopt-qtensor", "fp8", modelopt.fp8_real_steps, "modelopt 0.47, FP8QTensor (CPU)", "vectors"),
        Dialect("torchao", "fp8", torchao.fp8_steps,
                "torchao 0.18.0, quantization/quant_primitives.py (Float8Tensor, torch kernel)", "vectors"),
        Dialect("compressed-tensors", "fp8", compressed_tensors.fp8_steps,
                "compressed-tensors 0.19.0 / 0.20.0 + llmcompressor 0.14.0.1", "vectors"),
        Dialect("transformer-engine", "fp8", transformer_engine.fp8_steps,
                "transformer_engine 2.20.2, pytorch/custom_recipes/reference_current_scaling.py", "vectors"),
    )
}


def nvfp4_dialect(name: str) -> Dialect:
    return _lookup(NVFP4_DIALECTS, name, "NVFP4")


def fp8_dialect(name: str) -> Dialect:
    return _lookup(FP8_DIALECTS, name, "FP8")


def _lookup(table: dict[str, Dialect], name: str, what: str) -> Dialect:
    if name not in table:
        raise ValueError(f"{name!r} is not an {what} dialect; the {what} dialects are {', '.join(table)}.")
    return table[name]


def nvfp4_steps(x, dialect: str, global_amax=None) -> NVFP4Steps:
    """NVFP4 of x as `dialect` computes it (NVFP4_DIALECTS), step by step."""
    return nvfp4_dialect(dialect).steps(x, global_amax)


def fp8_steps(x, dialect: str, amax=None) -> FP8Steps:
    """FP8 E4M3 (per tensor) of x as `dialect` computes it (FP8_DIALECTS), step by step."""
    return fp8_dialect(dialect).steps(x, amax)


__all__ = [
    "Dialect",
    "FP8Steps",
    "FP8_DIALECTS",
    "NVFP4Steps",
    "NVFP4_DIALECTS",
    "fp8_dialect",
    "fp8_steps",
    "from_swizzled",
    "nvfp4_dialect",
    "nvfp4_steps",
    "to_swizzled",
]
