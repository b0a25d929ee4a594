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
    kernel = _experts_kernel(backend, sums, "refquant.compiled.ordered_sum_triton")
    return kernel if kernel is not None and sums.dtype in kernel.DTYPES else None


def routing_kernel(backend: str, top_k_index: torch.Tensor, experts: int) -> Optional[ModuleType]:
    """refquant.compiled.routing_triton (the fused experts' routing in four launches, no sort)
    where `backend` may use it for `top_k_index` over `experts` experts: the compiled backend, on
    CUDA, Triton importable, at most its MAX_EXPERTS. Else None (the torch steps of
    refquant.hf.experts_loop._Routing)."""
    kernel = _experts_kernel(backend, top_k_index, "refquant.compiled.routing_triton")
    return kernel if kernel is not None and experts <= kernel.MAX_EXPERTS else None


def _experts_kernel(backend: str, tensor: torch.Tensor, module: str) -> Optional[ModuleType]:
    """The Triton kernels of `module` for the experts loop, where the compiled backend runs them
    on `tensor`'s device (CUDA) and Triton imports; else None."""
    if backend != "compiled" or not tensor.is_cuda:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def release_blas_workspaces() -> bool:
    """refquant.compiled.private_api.release_blas_workspaces: the cuBLAS workspaces of every
    thread's handle given back (refquant.hf.grouped_linear's worker threads make their own);
    False where this torch cannot."""
    from ..compiled import private_api

    return private_api.release_blas_workspaces()


def can_release_blas_workspaces() -> bool:
    """Whether release_blas_workspaces can give them back here."""
    from ..compiled import private_api

    return private_api.can_release_blas_workspaces()
