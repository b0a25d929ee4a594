"""Which implementation of the numerics a quantizer calls: the eager reference or refquant.compiled.

Both expose the same functions with the same signatures and bits; "compiled" lowers the
reference's own functions through torch.compile.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

import torch

_MODULES = {"reference": "refquant.numerics", "compiled": "refquant.compiled"}
BACKENDS = tuple(_MODULES)


@functools.cache  # every quantizer call asks: a cache look-up, not an import's
def numerics(backend: str) -> ModuleType:
    """The module holding fp8_fake_quant, nvfp4_fake_quant, fp8_quantize, nvfp4_quantize."""
    if backend not in _MODULES:
        raise ValueError(f"backend={backend!r} is not known; use one of {', '.join(map(repr, BACKENDS))}.")
    return importlib.import_module(_MODULES[backend])


def ordered_sum_kernel(backend: str, sums: torch.Tensor) -> Optional[ModuleType]:
    """refquant.compiled.ordered_sum_triton (one launch adds a group of experts' routed rows onto
    their tokens' sums) where `backend` may use it for `sums`: the compiled backend, sums on CUDA
    in a dtype it takes, Triton importable. Else None (the reference backend stays pure torch)."""
    if backend != "compiled" or not sums.is_cuda:
        return None
    try:
        kernel = importlib.import_module("refquant.compiled.ordered_sum_triton")
    except ImportError:
        return None
    return kernel if sums.dtype in kernel.DTYPES else None
