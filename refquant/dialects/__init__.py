"""Dialects: NVFP4, FP8 and the OCP MX formats as each stack computes them, bit for bit, as pure
functions of tensors.

Every stack orders its float operations, reciprocals and edge cases its own way, so their bits
differ; each module here follows one stack's source, step by step, and returns an NVFP4Steps /
FP8Steps / MXSteps record (refquant.dialects.common, .mx) of what it computed: the scales, the
quotient it rounds, the codes, and its dequantized (fake-quant) values.

  modelopt.py            modelopt 0.47: refquant.numerics itself (kernel fake quant; NVFP4QTensor),
                         and MXFP4QTensor / MXFP8QTensor
  torchao.py             torchao 0.18, prototype/mx_formats NVFP4, MX (every scaling mode) and
                         Float8Tensor (PyTorch paths)
  microxcaling.py        microxcaling, the OCP MX spec's reference code (MXFP8, MXFP4)
  compressed_tensors.py  compressed-tensors 0.19 / 0.20 with llm-compressor 0.14's observers
  transformer_engine.py  TransformerEngine 2.20's PyTorch reference (NVFP4, FP8 current scaling)
  trtllm.py              TensorRT-LLM's routine as FlashInfer 0.7.2 ships it (fast math), from source
  vllm_emulation.py      vLLM's NVFP4 emulation (CPU path), from source
  mx.py                  the MX element formats, E8M0 scale bytes and the MXSteps record
  layouts.py             the swizzled 128x4 scale layout, to and from linear
  compare.py             which dialect an output agrees with, and where the others part from it

docs/dialects.md has the table of how each was verified and where they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from . import compressed_tensors, microxcaling, modelopt, torchao, transformer_engine, trtllm, vllm_emulation
from .common import FP8Steps, NVFP4Steps
from .layouts import from_swizzled, to_swizzled
from .mx import MX_FORMATS, MXSteps


@dataclass(frozen=True)
class Dialect:
    """One stack's NVFP4, FP8 or MX quantization: `steps(x, amax)` returns its NVFP4Steps /
    FP8Steps, `steps(x)` its MXSteps (MX scales come from the data alone).

    source:   the stack, its version and the file the module follows.
    verified: how refquant knows it computes the stack's bits ("vectors" when tests/vectors holds
              the stack's own outputs and CI compares them bit for bit, else "from source").
    """

    name: str
    format: str  # "nvfp4", "fp8", or an MX format: "mxfp8_e4m3", "mxfp8_e5m2", "mxfp4"
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


MICROXCALING_SOURCE = "microxcaling (github microsoft/microxcaling 7bc41952), mx/mx_ops.py, mx/elemwise_ops.py"
TORCHAO_MX_SOURCE = "torchao 0.18.0, prototype/mx_formats/mx_tensor.py to_mx, ScaleCalculationMode."


def _mx_dialects(mx_format: str) -> dict[str, Dialect]:
    element = MX_FORMATS[mx_format]
    dialects = [Dialect("microxcaling", mx_format, partial(microxcaling.mx_steps, element=element), MICROXCALING_SOURCE,
                        "vectors")]
    dialects += [Dialect(f"torchao-{mode}", mx_format, partial(torchao.mx_steps, element=element, scaling_mode=mode),
                         TORCHAO_MX_SOURCE + mode.upper(), "vectors") for mode in torchao.SCALING_MODES]
    if element == "e2m1":
        dialects.append(Dialect("modelopt-qtensor", mx_format, modelopt.mxfp4_qtensor_steps,
                                "modelopt 0.47, MXFP4QTensor", "vectors"))
    if element == "e4m3":
        dialects.append(Dialect("modelopt-qtensor", mx_format, modelopt.mxfp8_qtensor_steps,
                                "modelopt 0.47, MXFP8QTensor", "vectors"))
    return {d.name: d for d in dialects}


MX_DIALECTS: dict[str, dict[str, Dialect]] = {mx_format: _mx_dialects(mx_format) for mx_format in MX_FORMATS}


def nvfp4_dialect(name: str) -> Dialect:
    return _lookup(NVFP4_DIALECTS, name, "NVFP4")


def fp8_dialect(name: str) -> Dialect:
    return _lookup(FP8_DIALECTS, name, "FP8")


def mx_dialect(name: str, mx_format: str) -> Dialect:
    if mx_format not in MX_DIALECTS:
        raise ValueError(f"{mx_format!r} is not an MX format; the MX formats are {', '.join(MX_DIALECTS)}.")
    return _lookup(MX_DIALECTS[mx_format], name, mx_format)


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


def mx_steps(x, dialect: str, mx_format: str) -> MXSteps:
    """`mx_format` ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp4") of x as `dialect` computes it
    (MX_DIALECTS[mx_format]), step by step, in blocks of 32 along the last dim."""
    return mx_dialect(dialect, mx_format).steps(x)


__all__ = [
    "Dialect",
    "FP8Steps",
    "FP8_DIALECTS",
    "MXSteps",
    "MX_DIALECTS",
    "MX_FORMATS",
    "NVFP4Steps",
    "NVFP4_DIALECTS",
    "fp8_dialect",
    "fp8_steps",
    "from_swizzled",
    "mx_dialect",
    "mx_steps",
    "nvfp4_dialect",
    "nvfp4_steps",
    "to_swizzled",
]
