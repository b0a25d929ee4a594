"""The reference's numerics, each one torch.compile'd as it stands: same signatures, same bits.

Each public function here validates its arguments eagerly (cheap host checks; a tensor amax is
read back once, see refquant._checks.as_amax_tensor), presents the compiled graph a canonical
view of x, calls torch.compile(<the reference function>), and returns what the reference returns.
Nothing here computes a number: the math is refquant.fp8 / refquant.nvfp4, once.

Shapes: elementwise and per-block work sees x as (rows, last dim), rows marked dynamic, so every
leading shape (any batch x sequence length, any ndim) shares one graph. Degenerate inputs (0-d,
empty) go to the reference eagerly: they are not worth a graph, and it raises or returns for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch._dynamo.exc import Unsupported

from refquant import fp8 as reference_fp8
from refquant import nvfp4 as reference_nvfp4
from refquant._checks import AmaxLike, Flavor, as_amax_tensor, check_flavor, check_float_input

from .options import COMPILE_KWARGS, recompile_limit_patch

_compiled_fp8_fake_quant = torch.compile(reference_fp8.fp8_fake_quant, **COMPILE_KWARGS)
_compiled_fp8_quantize = torch.compile(reference_fp8.fp8_quantize, **COMPILE_KWARGS)
_compiled_fp8_dequantize = torch.compile(reference_fp8.FP8Tensor.dequantize, **COMPILE_KWARGS)
_compiled_nvfp4_fake_quant = torch.compile(reference_nvfp4.nvfp4_fake_quant, **COMPILE_KWARGS)
_compiled_nvfp4_quantize = torch.compile(reference_nvfp4.nvfp4_quantize, **COMPILE_KWARGS)
_compiled_nvfp4_dequantize = torch.compile(reference_nvfp4.NVFP4Tensor.dequantize, **COMPILE_KWARGS)


def _run(compiled: Callable, reference: Callable, *args, **kwargs):
    """compiled(*args, **kwargs); bad arguments raise the reference's own ValueError.

    Under fullgraph tracing a `raise ValueError` in the reference surfaces as dynamo's Unsupported;
    running the reference eagerly on the same arguments raises the real error. If the reference
    does not raise, the failure is ours and Unsupported propagates.
    """
    with recompile_limit_patch():
        try:
            return compiled(*args, **kwargs)
        except Unsupported as error:
            failure = error
    reference(*args, **kwargs)
    raise failure


def _rows(x: torch.Tensor, static_last_dim: bool = False) -> torch.Tensor:
    """x as (rows, last dim): a view where strides allow (a copy otherwise), rows dynamic.

    static_last_dim (NVFP4 on CUDA): blocks of 16 along a symbolic last dim leave inductor sizes
    it cannot simplify (n // (n // 16) for 16) and indexing it cannot fuse; a graph per hidden
    size is cheap. On the CPU one graph for every size keeps compile time down.
    """
    rows = x.reshape(-1, x.shape[-1])
    if not static_last_dim:
        return _dynamic(rows)
    rows = rows.view(rows.shape)
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    torch._dynamo.mark_static(rows, 1)
    return rows


def _dynamic(x: torch.Tensor) -> torch.Tensor:
    """A view of x whose every dim the graph takes as symbolic: one graph for all sizes.

    maybe_mark_dynamic, not mark_dynamic: sizes 0 and 1 may still get their own graph. The mark
    goes on a fresh view, never on the caller's tensor.
    """
    view = x.view(x.shape)
    for dim in range(view.ndim):
        torch._dynamo.maybe_mark_dynamic(view, dim)
    return view


def _is_per_tensor(t: torch.Tensor | None) -> bool:
    return t is None or t.ndim == 0


def _is_degenerate(x: object) -> bool:
    return not isinstance(x, torch.Tensor) or x.ndim == 0 or x.numel() == 0


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------


@dataclass
class FP8Tensor(reference_fp8.FP8Tensor):
    """refquant.FP8Tensor whose dequantize() runs compiled (same fields, same bits)."""

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if _is_degenerate(self.data):
            return reference_fp8.FP8Tensor.dequantize(self, dtype)
        dynamic = reference_fp8.FP8Tensor(_dynamic(self.data), _dynamic(self.scale), self.dtype, self.block_size)
        return _run(_compiled_fp8_dequantize, reference_fp8.FP8Tensor.dequantize, dynamic, dtype)


def fp8_fake_quant(
    x: torch.Tensor,
    amax: AmaxLike = None,
    *,
    axis: int | tuple[int, ...] | None = None,
    flavor: Flavor = "modelopt-cpu",
) -> torch.Tensor:
    """refquant.fp8_fake_quant through torch.compile: same arguments, same bits."""
    if _is_degenerate(x):
        return reference_fp8.fp8_fake_quant(x, amax, axis=axis, flavor=flavor)
    check_flavor(flavor)
    check_float_input(x)
    if amax is not None:
        amax = as_amax_tensor(amax, x)
    if axis is None and _is_per_tensor(amax):
        rows = _rows(x)
        out = _run(_compiled_fp8_fake_quant, reference_fp8.fp8_fake_quant, rows, amax, axis=None, flavor=flavor)
        return out.reshape(x.shape)
    amax = None if amax is None else _dynamic(amax)
    return _run(_compiled_fp8_fake_quant, reference_fp8.fp8_fake_quant, _dynamic(x), amax, axis=axis, flavor=flavor)


def fp8_quantize(
    x: torch.Tensor,
    amax: AmaxLike = None,
    *,
    scale: torch.Tensor | float | None = None,
    axis: int | tuple[int, ...] | None = None,
    block_size: int | None = None,
    flavor: Flavor = "modelopt-cpu",
) -> FP8Tensor:
    """refquant.fp8_quantize through torch.compile; an FP8Tensor whose dequantize is compiled too."""
    if _is_degenerate(x):
        return _compiled_result(reference_fp8.fp8_quantize(x, amax, scale=scale, axis=axis, block_size=block_size, flavor=flavor))
    check_flavor(flavor)
    check_float_input(x)
    if amax is not None:
        amax = as_amax_tensor(amax, x)
    if scale is not None:  # a float scale becomes an fp32 tensor, as in the reference
        scale = as_amax_tensor(scale, x, what="scale")
    kwargs = dict(scale=scale, axis=axis, block_size=block_size, flavor=flavor)
    if axis is None and _is_per_tensor(amax) and _is_per_tensor(scale):
        quantized = _run(_compiled_fp8_quantize, reference_fp8.fp8_quantize, _rows(x), amax, **kwargs)
        lead = x.shape[:-1]
        block_scale = quantized.scale if block_size is None else quantized.scale.reshape(*lead, -1)
        return FP8Tensor(quantized.data.reshape(x.shape), block_scale, quantized.dtype, quantized.block_size)
    amax = None if amax is None else _dynamic(amax)
    kwargs["scale"] = None if scale is None else _dynamic(scale)
    return _compiled_result(_run(_compiled_fp8_quantize, reference_fp8.fp8_quantize, _dynamic(x), amax, **kwargs))


def _compiled_result(quantized: reference_fp8.FP8Tensor) -> FP8Tensor:
    return FP8Tensor(quantized.data, quantized.scale, quantized.dtype, quantized.block_size)


# ---------------------------------------------------------------------------------------------
# NVFP4 (per-block along the last dim: every leading shape is rows)
# ---------------------------------------------------------------------------------------------


@dataclass
class NVFP4Tensor(reference_nvfp4.NVFP4Tensor):
    """refquant.NVFP4Tensor whose dequantize() runs compiled (same fields, same bits)."""

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.packed.ndim == 0 or self.packed.numel() == 0:
            return reference_nvfp4.NVFP4Tensor.dequantize(self, dtype)
        # The reference takes the leading dims from packed and only the last one from shape.
        as_rows = reference_nvfp4.NVFP4Tensor(
            packed=_rows(self.packed, static_last_dim=self.packed.is_cuda),
            block_scale=_rows(self.block_scale, static_last_dim=self.packed.is_cuda),
            global_scale=self.global_scale,
            shape=torch.Size([self.packed.numel() // self.packed.shape[-1], self.shape[-1]]),
            dtype=self.dtype,
        )
        out = _run(_compiled_nvfp4_dequantize, reference_nvfp4.NVFP4Tensor.dequantize, as_rows, dtype)
        return out.reshape(self.shape)


def nvfp4_fake_quant(x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu") -> torch.Tensor:
    """refquant.nvfp4_fake_quant through torch.compile: same arguments, same bits."""
    if _is_degenerate(x):
        return reference_nvfp4.nvfp4_fake_quant(x, amax, flavor=flavor)
    check_flavor(flavor)
    check_float_input(x)
    if amax is not None:
        amax = as_amax_tensor(amax, x)
    out = _run(_compiled_nvfp4_fake_quant, reference_nvfp4.nvfp4_fake_quant, _rows(x, static_last_dim=x.is_cuda), amax)
    return out.reshape(x.shape)


def nvfp4_quantize(x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu") -> NVFP4Tensor:
    """refquant.nvfp4_quantize through torch.compile; an NVFP4Tensor whose dequantize is compiled."""
    if _is_degenerate(x):
        quantized = reference_nvfp4.nvfp4_quantize(x, amax, flavor=flavor)
        return NVFP4Tensor(quantized.packed, quantized.block_scale, quantized.global_scale, quantized.shape, quantized.dtype)
    check_flavor(flavor)
    check_float_input(x)
    if amax is not None:
        amax = as_amax_tensor(amax, x)
    quantized = _run(_compiled_nvfp4_quantize, reference_nvfp4.nvfp4_quantize, _rows(x, static_last_dim=x.is_cuda), amax, flavor=flavor)
    lead = x.shape[:-1]
    return NVFP4Tensor(
        packed=quantized.packed.reshape(*lead, -1),
        block_scale=quantized.block_scale.reshape(*lead, -1),
        global_scale=quantized.global_scale,
        shape=x.shape,
        dtype=x.dtype,
    )
