"""Input validation shared by the numerics. Errors say what is wrong and what to do instead."""

from __future__ import annotations

import math
import struct
import weakref
from typing import Literal, Union

import torch

from .formats import FP32_MAX, SUPPORTED_FLOAT_DTYPES

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
    same at the point of use). Values are checked: a negative, NaN or infinite amax, or one that
    fp32 cannot hold (the numerics compute in fp32, where 1e300 is inf), is a bug upstream, and
    modelopt would silently turn it into garbage. `positive` also rejects 0, and a value that is
    0 in fp32 (for a divisor such as a given FP8 scale).

    A CPU tensor is checked on every call (reading it costs no sync), so a write that moves no
    version counter (`amax.data.copy_(...)`) is seen too. A tensor on a GPU is checked once per
    object and version (_already_checked): a check there is a device sync.
    """
    if isinstance(amax, bool) or not isinstance(amax, (torch.Tensor, float, int)):
        raise ValueError(f"{what} must be a float or a tensor, got {type(amax).__name__}.")
    if not isinstance(amax, torch.Tensor):
        if not is_valid_amax_value(amax, positive):  # on the host: no sync
            _raise_bad_amax(what, [amax], positive)
        # A fill on x's device, not torch.tensor(value, device=...): that copies from host memory,
        # and a copy from pageable memory waits for the device (a sync per call on CUDA).
        return torch.full((), float(amax), dtype=torch.float32, device=x.device)
    if not amax.is_floating_point():
        raise ValueError(f"{what} has dtype {amax.dtype}; pass a floating-point amax.")
    amax = amax.to(x.device)
    cached = not positive and amax.device.type != "cpu"
    if not _is_tracing() and not (cached and _already_checked(amax)):
        bad = bad_amax_values(amax, positive)
        if bad:
            _raise_bad_amax(what, bad, positive)
        if cached:
            _remember_checked(amax)
    return amax


def fp32_value(value: float) -> float:
    """A Python number rounded to fp32 as torch rounds it (to nearest even; inf beyond fp32's range)."""
    try:
        return struct.unpack("f", struct.pack("f", float(value)))[0]
    except OverflowError:  # finite, but rounds past fp32's largest value (or an int past float's)
        return math.inf if value > 0 else -math.inf


def is_valid_amax_value(value: float, positive: bool = False) -> bool:
    """Whether a number is a valid amax (finite in fp32, >= 0) or, with `positive`, a valid
    divisor (finite and > 0 in fp32)."""
    if not positive and 0 <= value <= FP32_MAX:  # the common case, without the rounding
        return True
    rounded = fp32_value(value)
    return math.isfinite(rounded) and (rounded > 0 if positive else value >= 0)


def bad_amax_values(amax: torch.Tensor, positive: bool = False) -> list:
    """The values of an amax tensor that is_valid_amax_value refuses (up to four), read back to the
    host: `.item()` for one element; for more, its smallest and largest value (one reduction and
    one read, a device sync on a GPU), which decide it (NaN makes both NaN, and the rounding to
    fp32 keeps the order), and only when they fail, the offending values."""
    if amax.numel() == 1:
        value = amax.item()
        return [] if is_valid_amax_value(value, positive) else [value]
    if all(is_valid_amax_value(value, positive) for value in torch.stack(torch.aminmax(amax)).tolist()):
        return []
    values = amax.float()  # the numerics' own conversion: 1e300 in float64 is inf here
    bad = ~torch.isfinite(values) | ((values <= 0) if positive else (amax < 0))
    if not bool(bad.any()):
        return []
    return amax.flatten()[bad.flatten()][:4].tolist()


def _raise_bad_amax(what: str, bad_values: list, positive: bool = False) -> None:
    meaning = "it is the largest |value| to represent" if what == "amax" else "x is divided by it"
    bound = "> 0" if positive else ">= 0"
    raise ValueError(
        f"{what} must be finite and {bound} in fp32 ({meaning}; fp32 holds magnitudes up to "
        f"{FP32_MAX}); got {bad_values}. Recalibrate, or pass {what}=None to take it from the data."
    )


# Tensors on a GPU whose values passed the amax check, by id, with the version counter they had
# then: a quantizer's calibrated amax is checked once, not synced on every call. An in-place change
# moves the version (so it is checked again), except a write through `.data`, which moves none
# (the quantizer reads its own amax on every call, refquant.quant.quantizer); the weak reference
# tells a recycled id apart.
_CHECKED: dict[int, tuple[weakref.ref, int]] = {}
_CHECKED_MAX_ENTRIES = 4096


def _already_checked(amax: torch.Tensor) -> bool:
    entry = _CHECKED.get(id(amax))
    return entry is not None and entry[0]() is amax and entry[1] == amax._version


def vouch_checked(amax: torch.Tensor) -> None:
    """Record that a GPU amax tensor holds values its maker checked (e.g. stacked from buffers
    each checked already), so as_amax_tensor does not read it back to check it again (a device
    sync a call). Until its version moves."""
    if amax.device.type != "cpu":
        _remember_checked(amax)


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


def _each_read_back_once(tensors: list[torch.Tensor], reduce, each) -> list:
    """reduce(t), a 0-d tensor, of each tensor as a Python number, read back from each device once:
    a model's amaxes read one by one would wait for the device once each. One-element tensors of
    one dtype (a model holds thousands of such amaxes) are stacked and given to `each`, which
    gives, element by element, what reduce gives for a tensor of that one element: one launch
    for all of them, not one each."""
    values: list = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(index)
    for indices in by_device.values():
        results, order = [], []
        scalars: dict[torch.dtype, list[int]] = {}
        for i in indices:
            if tensors[i].numel() == 1:
                scalars.setdefault(tensors[i].dtype, []).append(i)
            else:
                results.append(reduce(tensors[i]).reshape(1))
                order.append(i)
        for group in scalars.values():
            results.append(each(torch.stack([tensors[i].reshape(()) for i in group])))
            order += group
        for i, value in zip(order, torch.cat([r.float() for r in results]).tolist()):
            values[i] = value
    return values


def largest_values(tensors: list[torch.Tensor]) -> list[float]:
    """float(t.float().max()) of each tensor (NaN where it holds one), one read back a device."""
    return _each_read_back_once(tensors, lambda t: t.float().max(), lambda stacked: stacked.float())


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, one read back a device."""
    return all(_each_read_back_once(tensors, lambda t: torch.isfinite(t).all(), torch.isfinite))


def max_abs_one_kernel(x: torch.Tensor) -> torch.Tensor:
    """max_abs(x), the same value (NaN propagating, in x's dtype), as one reduction that reads x
    once: torch.linalg.vector_norm with ord inf. For eager callers such as calibration, which
    collects it at every quantizer call; max_abs's two steps are for torch.compile."""
    return torch.linalg.vector_norm(x, ord=math.inf)


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
