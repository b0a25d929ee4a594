"""Input validation shared by the numerics. Errors say what is wrong and what to do instead."""

from __future__ import annotations

import math
import weakref
from typing import Literal, Union

import torch

from .formats import SUPPORTED_FLOAT_DTYPES

Flavor = Literal["modelopt-cpu", "modelopt-cuda"]
FLAVORS: tuple[str, ...] = ("modelopt-cpu", "modelopt-cuda")
AmaxLike = Union[torch.Tensor, float, int, None]


def check_flavor(flavor: str) -> None:
    if flavor not in FLAVORS:
        raise ValueError(
            f"flavor={flavor!r} is not known; use 'modelopt-cpu' (modelopt's eager CPU run, the "
            "default) or 'modelopt-cuda' (modelopt's GPU run). refquant's docs/contract.md §2 explains both."
        )


def check_float_input(x: object, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise ValueError(
            f"{what} has dtype {x.dtype}; refquant quantizes float32, bfloat16 and float16 tensors. "
            f"Convert it first, e.g. {what}.to(torch.float32)."
        )
    return x


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def as_amax_tensor(amax: AmaxLike, x: torch.Tensor, what: str = "amax", *, positive: bool = False) -> torch.Tensor:
    """Turn a user amax (float, int or tensor) into a tensor on x's device; fp32 for numbers.

    A tensor keeps its dtype (modelopt converts with .float() where it computes, and we do the
    same at the point of use). Values are checked: a negative, NaN or infinite amax is a bug
    upstream, and modelopt would silently turn it into garbage. `positive` also rejects 0 (for a
    divisor such as a given FP8 scale).
    """
    if isinstance(amax, bool) or not isinstance(amax, (torch.Tensor, float, int)):
        raise ValueError(f"{what} must be a float or a tensor, got {type(amax).__name__}.")
    if not isinstance(amax, torch.Tensor):
        if not (math.isfinite(amax) and (amax > 0 if positive else amax >= 0)):  # on the host: no sync
            _raise_bad_amax(what, [amax], positive)
        # A fill on x's device, not torch.tensor(value, device=...): that copies from host memory,
        # and a copy from pageable memory waits for the device (a sync per call on CUDA).
        return torch.full((), float(amax), dtype=torch.float32, device=x.device)
    if not amax.is_floating_point():
        raise ValueError(f"{what} has dtype {amax.dtype}; pass a floating-point amax.")
    amax = amax.to(x.device)
    if not _is_tracing() and (positive or not _already_checked(amax)):
        bad = ~torch.isfinite(amax) | ((amax <= 0) if positive else (amax < 0))
        if bool(bad.any()):  # reads back to the host: a device sync, hence _already_checked
            _raise_bad_amax(what, amax.flatten()[bad.flatten()][:4].tolist(), positive)
        if not positive:
            _remember_checked(amax)
    return amax


def _raise_bad_amax(what: str, bad_values: list, positive: bool = False) -> None:
    meaning = "it is the largest |value| to represent" if what == "amax" else "x is divided by it"
    bound = "> 0" if positive else ">= 0"
    raise ValueError(
        f"{what} must be finite and {bound} ({meaning}); got "
        f"{bad_values}. Recalibrate, or pass {what}=None to take it from the data."
    )


# Tensors whose values passed the amax check, by id, with the version counter they had then: a
# quantizer's calibrated amax is checked once, not synced on every forward. An in-place change
# moves the version (so it is checked again); the weak reference tells a recycled id apart.
_CHECKED: dict[int, tuple[weakref.ref, int]] = {}
_CHECKED_MAX_ENTRIES = 4096


def _already_checked(amax: torch.Tensor) -> bool:
    entry = _CHECKED.get(id(amax))
    return entry is not None and entry[0]() is amax and entry[1] == amax._version


def _remember_checked(amax: torch.Tensor) -> None:
    if len(_CHECKED) >= _CHECKED_MAX_ENTRIES:
        _CHECKED.clear()
    _CHECKED[id(amax)] = (weakref.ref(amax), amax._version)


def check_channel_amax(amax: torch.Tensor, x: torch.Tensor, what: str = "amax") -> None:
    """Per-tensor (one element) or keep-dims per-channel: same ndim as x, each dim 1 or x's size."""
    if amax.numel() == 1 and amax.ndim <= x.ndim:
        return
    ok = amax.ndim == x.ndim and all(a in (1, s) for a, s in zip(amax.shape, x.shape))
    if not ok:
        raise ValueError(
            f"{what} of shape {tuple(amax.shape)} does not fit x of shape {tuple(x.shape)}: a "
            "per-channel amax keeps x's dims, with size 1 on every reduced dim (e.g. "
            f"x.abs().amax(dim=1, keepdim=True) gives {_example_shape(x)}). Reshape it, or pass a "
            "0-d tensor for one per-tensor amax."
        )


def _example_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(s if i != 1 else 1 for i, s in enumerate(x.shape)) if x.ndim > 1 else (1,)


def normalize_axes(axis: int | tuple[int, ...] | list[int] | None, ndim: int) -> tuple[int, ...]:
    """The dims that keep their own amax (modelopt's `axis`), as non-negative ints."""
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a!r} is out of range for a {ndim}-d tensor; use an int in [{-ndim}, {ndim - 1}]."
            )
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def max_abs(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor, in x's dtype; NaN propagates (modelopt's amax).

    Taken row by row along the last dim, then over the rows: the same value (a max is exact), but
    under torch.compile the first step reads x as long contiguous rows, which inductor reduces
    near memory bandwidth, and the second step is tiny (docs/compiled.md).
    """
    if x.ndim < 2:
        return x.abs().amax()
    return x.abs().amax(dim=-1).amax()


def reduce_amax(x: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """max|x| over every dim not in `axis` (all dims when None), keep-dims, in x's dtype.

    modelopt's reduce_amax: NaN propagates (so a NaN input gives a NaN amax).
    """
    keep = normalize_axes(axis, x.ndim)
    if not keep:
        return max_abs(x)
    reduce_dims = tuple(d for d in range(x.ndim) if d not in keep)
    if not reduce_dims:
        return x.abs()
    return x.abs().amax(dim=reduce_dims, keepdim=True)
