"""The reference's numerics, each one torch.compile'd as it stands: same signatures, same bits.

Each public function here validates its arguments eagerly (cheap host checks; a tensor amax is
read back once, see refquant.numerics.checks.as_amax_tensor), presents the compiled graph a
canonical view of x, calls torch.compile(<the reference function>), and returns what the
reference returns. Nothing here computes a number: the math is refquant.numerics.fp8 /
refquant.numerics.nvfp4, once. On CUDA a few calls launch a Triton kernel of ours instead of the
graph (a fake quant under a given per-tensor amax, NVFP4's block steps, per-slice amaxes): each
kernel is the reference's step written for the GPU and held to it bit for bit by the CUDA tests.

Shapes: elementwise and per-block work sees x as (rows, last dim), rows marked dynamic, so every
leading shape (any batch x sequence length, any ndim) shares one graph; the last dim is static on
CUDA (a graph per hidden size, see _mark) and dynamic on the CPU. Degenerate inputs (0-d, empty)
go to the reference eagerly: they are not worth a graph, and it raises or returns for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..numerics import fp8 as reference_fp8
from ..numerics import nvfp4 as reference_nvfp4
from ..numerics.checks import AmaxLike, Flavor, as_amax_tensor, check_flavor, check_float_input, is_valid_amax_value
from ..numerics.formats import NVFP4_BLOCK_SIZE
from ..numerics.gpu_division import reciprocal_table
from ..numerics.straight_through import straight_through

from . import private_api
from .options import (
    FP8_REALIZE_OPCOUNT_THRESHOLD,
    LIMIT_PER_FUNCTION,
    REALIZE_OPCOUNT_THRESHOLD,
    CompiledPerSignature,
    recompile_limit_patch,
)

if TYPE_CHECKING:  # Triton is imported where a kernel of ours is launched, never at refquant's import
    from .triton_launch import FakeQuantKernel


def _mark_positional(args: tuple) -> None:
    """Every positional tensor of rank >= 1 marked as _mark says, for dynamo to trace it so should
    this call compile. The wrappers below pass such tensors as objects of their own (_rows, _own),
    so a mark never lands on a caller's tensor."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.ndim:
            _mark(a)


def _compiled(fn: Callable, realize_opcount_threshold: int = REALIZE_OPCOUNT_THRESHOLD) -> CompiledPerSignature:
    return CompiledPerSignature(fn, realize_opcount_threshold)


_compiled_fp8_fake_quant = _compiled(reference_fp8.fp8_fake_quant, FP8_REALIZE_OPCOUNT_THRESHOLD)
_compiled_fp8_quantize = _compiled(reference_fp8.fp8_quantize, FP8_REALIZE_OPCOUNT_THRESHOLD)
_compiled_fp8_dequantize = _compiled(reference_fp8.FP8Tensor.dequantize, FP8_REALIZE_OPCOUNT_THRESHOLD)
_compiled_nvfp4_fake_quant = _compiled(reference_nvfp4.nvfp4_fake_quant)
_compiled_nvfp4_quantize = _compiled(reference_nvfp4.nvfp4_quantize)
_compiled_nvfp4_dequantize = _compiled(reference_nvfp4.NVFP4Tensor.dequantize)


def _run(compiled: CompiledPerSignature | Callable, reference: Callable, *args, **kwargs):
    """compiled(*args, **kwargs) (the torch.compile for this signature); bad arguments raise the
    reference's own ValueError.

    Under fullgraph tracing a `raise ValueError` in the reference surfaces as dynamo's Unsupported;
    running the reference eagerly on the same arguments raises the real error. If the reference
    does not raise, the failure is ours and Unsupported propagates.
    """
    if isinstance(compiled, CompiledPerSignature):
        if torch.compiler.is_compiling():
            # inside a user's torch.compile: dynamo inlines the function into their graph (making
            # a compiled copy of it here, for_call, is not something dynamo can trace)
            return compiled.fn(*args, **kwargs)
        compiled = compiled.for_call(args, kwargs)
        _mark_positional(args)
    try:
        try:
            return compiled(*args, **kwargs)
        except private_api.RecompileLimitHit:
            if LIMIT_PER_FUNCTION:
                raise
            # torch < 2.13 has only the global limit: raise it for this one compile, not per call.
            with recompile_limit_patch():
                return compiled(*args, **kwargs)
    except private_api.DynamoUnsupported as error:
        failure = error
    reference(*args, **kwargs)
    raise failure


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last dim), a tensor object of our own (see _own): a view where strides allow,
    a copy otherwise.

    The rows are dynamic (marked by _mark_positional before dynamo sees them): every batch x sequence
    length and every ndim share one graph. The last dim is static on CUDA (see _mark) and dynamic
    on the CPU.
    """
    return _own(x if x.ndim == 2 else x.reshape(-1, x.shape[-1]))


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a tensor object of our own, for the graph: marks then never land on a caller's tensor
    (see _mark_positional), and it is not a view, so dynamo's guards do not reach into how the caller's
    tensor was made (a view's guards check its base's sizes, and a graph traced on a reshaped
    4-D tensor would not take a 2-D one). detach() gives such an alias; under grad mode a tensor
    that requires grad gets a view instead, which keeps the autograd graph. None and 0-d tensors
    (no marks) stay as they are."""
    if t is None or t.ndim == 0:
        return t
    if t.requires_grad and torch.is_grad_enabled():
        return t.view(t.shape)
    return t.detach()


def _as_shape_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out if out.shape == x.shape else out.reshape(x.shape)


def _dynamic(x: torch.Tensor) -> torch.Tensor:
    """A view of x (never the caller's tensor object) marked as _mark says, keeping x's shape."""
    view = x.view(x.shape)
    _mark(view)
    return view


def _mark(t: torch.Tensor) -> None:
    """Every dim dynamic for the graph, except the last one on CUDA, which stays static.

    maybe_mark_dynamic, not mark_dynamic: dynamo still specializes sizes 0 and 1, and a strict
    mark (or one with a size hint) cost about 120 us more per call on the H100's host.
    Why the last dim is static on CUDA (H100, 8192 x 16384 bf16): with a symbolic last dim the
    kernel's element count has no known divisibility, so Triton cannot vectorize the masked loads
    and stores (FP8 fake quant: 0.26 ms against 0.18 ms with it static, the copy's time), and
    blocks of 16 along it give inductor sizes it cannot simplify (n // (n // 16)) and indexing it
    cannot fuse. The cost is a graph per hidden size. On the CPU one graph for every size keeps
    compile time down, and the C++ kernels don't mind.
    """
    last = t.ndim - 1
    torch._dynamo.maybe_mark_dynamic(t, tuple(range(last)) if t.is_cuda else tuple(range(t.ndim)))
    if t.is_cuda and last >= 0:
        torch._dynamo.mark_static(t, last)


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
        amax = _given_amax(amax, x)
    if axis is None and _is_per_tensor(amax):
        if _one_launch_takes(x, amax, unit=1):
            from . import fp8_fake_triton

            return fp8_fake_triton.fake_quant_kernel(flavor)(x, (amax,))
        out = _run(_compiled_fp8_fake_quant, reference_fp8.fp8_fake_quant, _rows(x), amax, axis=None, flavor=flavor)
        return _as_shape_of(out, x)
    if axis is None and _takes_kernel_per_slice(x, amax, BoundKernelLaunch.DTYPES):
        return _fake_quant_slices(_slice_kernels("fp8", flavor), x, amax)
    return _run(_compiled_fp8_fake_quant, reference_fp8.fp8_fake_quant, _own(x), _own(amax), axis=axis, flavor=flavor)


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
    kwargs["scale"] = None if scale is None else _dynamic(scale)  # a keyword: _mark_positional does not see it
    return _compiled_result(_run(_compiled_fp8_quantize, reference_fp8.fp8_quantize, _own(x), _own(amax), **kwargs))


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
            packed=_dynamic(_rows(self.packed)),  # fields: _mark_positional marks only tensor arguments
            block_scale=_dynamic(_rows(self.block_scale)),
            global_scale=self.global_scale,
            shape=torch.Size([self.packed.numel() // self.packed.shape[-1], self.shape[-1]]),
            dtype=self.dtype,
        )
        out = _run(_compiled_nvfp4_dequantize, reference_nvfp4.NVFP4Tensor.dequantize, as_rows, dtype)
        return out.reshape(self.shape)


def nvfp4_fake_quant(
    x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu", per_slice_amax: bool = False
) -> torch.Tensor:
    """refquant.nvfp4_fake_quant through torch.compile: same arguments, same bits."""
    if _is_degenerate(x):
        return reference_nvfp4.nvfp4_fake_quant(x, amax, flavor=flavor, per_slice_amax=per_slice_amax)
    check_flavor(flavor)
    check_float_input(x)
    if amax is not None:
        amax = _given_amax(amax, x)
    if per_slice_amax and not _is_per_tensor(amax) and amax.numel() != 1:
        # one global amax per slice (a stack of expert weights)
        if _takes_triton_block_step(x) and _takes_kernel_per_slice(x, amax, BoundKernelLaunch.DTYPES):
            return _fake_quant_slices(_slice_kernels("nvfp4", flavor), x, amax)
        return _run(_nvfp4_fake_quant_graph(x, per_slice=True), reference_nvfp4.nvfp4_fake_quant, _own(x), _own(amax),
                    per_slice_amax=True)
    if _one_launch_takes(x, amax, unit=NVFP4_BLOCK_SIZE):
        from . import nvfp4_fake_triton

        return nvfp4_fake_triton.fake_quant_kernel()(x, (amax,))
    out = _run(_nvfp4_fake_quant_graph(x), reference_nvfp4.nvfp4_fake_quant, _rows(x), amax)
    return _as_shape_of(out, x)


def _takes_kernel_per_slice(x: torch.Tensor, amax: torch.Tensor, dtypes: tuple) -> bool:
    """Whether a fake quant of x under one amax per slice along dim 0 (amax of shape (E, 1, ..., 1),
    a stack of expert weights) runs as our Triton kernel, slice by slice: CUDA, a dtype the kernel
    is checked for, contiguous, outside autograd."""
    return (x.is_cuda and x.dtype in dtypes and x.is_contiguous() and x.ndim >= 2
            and amax.ndim == x.ndim and amax.shape[0] == amax.numel() == x.shape[0]
            and not (x.requires_grad and torch.is_grad_enabled()))


def _one_launch_takes(x: torch.Tensor, amax: torch.Tensor | None, *, unit: int) -> bool:
    """Whether a fake quant of x under this given per-tensor amax is one launch of the kernel a
    bound quantizer launches (FP8: fp8_fake_triton.py, unit 1; NVFP4: nvfp4_fake_triton.py, unit
    16), unbound: CUDA, a dtype the kernel is checked for, an amax of 0 dims in a dtype the
    quantizers bind. A call then costs a launch's host time (refquant.compiled.triton_launch), not
    dynamo's guards and inductor's wrapper around the same kernel; the kernels are held to the
    reference bit for bit on CUDA (tests/test_fp8_fake_kernel.py, tests/test_nvfp4_fake_kernel.py)."""
    return (amax is not None and amax.ndim == 0 and amax.dtype in _AMAX_DTYPES and x.is_cuda
            and x.dtype in BoundKernelLaunch.DTYPES and _launch_takes(x, unit)
            and not (amax.requires_grad and torch.is_grad_enabled()))


_AMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # a quantizer's buffer (x's dtype) or a number's fp32


def _given_amax(amax: AmaxLike, x: torch.Tensor) -> torch.Tensor:
    """as_amax_tensor(amax, x), where a valid number on CUDA is the one fp32 tensor of its value
    kept per device (_constant_amax): not a fill, a launch of its own, on every call. Inside a
    user's torch.compile the fill stays (it becomes part of their graph)."""
    if (x.is_cuda and isinstance(amax, (int, float)) and not isinstance(amax, bool) and is_valid_amax_value(amax)
            and not torch.compiler.is_compiling()):
        return _constant_amax(float(amax), x.device)
    return as_amax_tensor(amax, x)


def _fake_quant_slices(kernel_of: Callable[[int], FakeQuantKernel], x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Each slice x[i] fake-quantized by a kernel of ours under its own amax amax[i], which is the
    reference's per-slice result (each kernel is held to the reference for one amax, and per slice
    to the per-slice reference); no graph, and for NVFP4 no GPU-division table on the device (the
    kernel divides as the GPU does). kernel_of(programs_per_slice): the kernel, 0 for one amax.

    One launch for the whole stack where a slice is a whole number of the kernel's programs (each
    program then lies in one slice and reads that slice's amax: expert weights, whose sizes are
    multiples of 4096); else one launch a slice."""
    programs_per_slice = _whole_programs_per_slice(kernel_of, x)
    if programs_per_slice:
        return kernel_of(programs_per_slice)(x, (amax.reshape(-1).contiguous(),))
    one_amax = kernel_of(0)
    out = torch.empty_like(x)
    for index, slice_amax in enumerate(amax.reshape(-1).unbind(0)):
        one_amax(x[index], (slice_amax,), out[index])
    return out


def _slice_kernels(format: str, flavor: Flavor) -> Callable[[int], FakeQuantKernel]:
    """kernel_of(programs_per_slice) for the fake kernel of `format` (FP8: of `flavor`; 0: one amax)."""
    if format == "fp8":
        from . import fp8_fake_triton

        return functools.partial(fp8_fake_triton.fake_quant_kernel, flavor)
    from . import nvfp4_fake_triton

    return nvfp4_fake_triton.fake_quant_kernel


def _whole_programs_per_slice(kernel_of: Callable[[int], FakeQuantKernel], x: torch.Tensor) -> int:
    """How many of the kernel's programs one slice x[i] is, where that is a whole number; else 0."""
    one_amax = kernel_of(0)
    programs_per_slice, rest = divmod(x[0].numel() // one_amax.unit, one_amax.per_program)
    return 0 if rest else programs_per_slice


def _takes_triton_block_step(x: torch.Tensor) -> bool:
    """Whether NVFP4's block step runs as our Triton kernel for x: CUDA, last dim a multiple of 16."""
    return x.is_cuda and x.shape[-1] % NVFP4_BLOCK_SIZE == 0


def _nvfp4_fake_quant_graph(x: torch.Tensor, per_slice: bool = False) -> CompiledPerSignature:
    """The compiled reference, or where _takes_triton_block_step (one global amax) the same with
    its block step run by the Triton kernel of nvfp4_fake_triton.py. The compiled reference reads
    the GPU-division table as a constant: it is decoded here, eagerly (dynamo cannot trace the
    file read)."""
    if not per_slice and _takes_triton_block_step(x):
        return _nvfp4_fake_quant_with_triton_blocks()
    reciprocal_table(x.device)
    return _compiled_nvfp4_fake_quant


def _nvfp4_fake_quant_triton_blocks(x: torch.Tensor, amax: AmaxLike = None) -> torch.Tensor:
    """refquant.nvfp4_fake_quant with its block step (refquant.numerics.nvfp4.nvfp4_fake_quant_blocks)
    run by the Triton kernel of nvfp4_fake_triton.py: CUDA, last dim a multiple of 16, x not
    empty. The global amax and the gradient (straight through) are the reference's own code."""
    from .nvfp4_fake_triton import nvfp4_fake_quant_blocks

    global_amax = reference_nvfp4.resolve_global_amax(x.detach(), amax)
    return straight_through(nvfp4_fake_quant_blocks, x.contiguous(), global_amax)


@functools.cache
def _nvfp4_fake_quant_with_triton_blocks() -> CompiledPerSignature:
    """The compiled _nvfp4_fake_quant_triton_blocks, made on first use (CPU-only installs have no Triton)."""
    return _compiled(_nvfp4_fake_quant_triton_blocks)


# ---------------------------------------------------------------------------------------------
# A fake quantizer's call, bound once (refquant.quant.quantizer.TensorQuantizer's fast path)
# ---------------------------------------------------------------------------------------------


class BoundKernelLaunch:
    """A fake quantization for one fixed amax on CUDA whose whole call is one launch of a Triton
    kernel of ours (nvfp4_fake_triton.py, fp8_fake_triton.py), past the graph around it (its
    guards, inductor's wrapper and launcher chain): refquant.compiled.triton_launch, whose
    FakeQuantKernel says how the kernel is launched. It takes tensors of the dtype and device it
    was bound for, laid out as rows in memory (_rows_in_memory: contiguous, or a permutation of it
    with the last dim innermost, as K and V reach the attention without a KV cache), last dim a
    multiple of the kernel's unit, not empty, and outside autograd (no requires_grad under grad
    mode); for any other it returns None and the caller makes the ordinary call. Made by
    bind_fake_quant for bf16 and fp16 only (checked on a GPU against the reference, every
    pattern): fp32 binds nothing and takes the ordinary call (the fake kernel's fp32 path is not
    checked through this launch).

    A PTQ forward makes ~100 of these calls and the host sets its pace, so a call does only what
    changes from call to call: the checks of x, then FakeQuantKernel.launch_bound (the output's
    allocation and the look-up of the compiled kernel by what can still change; dtypes, device
    and constexprs were fixed when bound). With the fast launch off, each call is Triton's own
    kernel[grid](...)."""

    DTYPES = (torch.bfloat16, torch.float16)
    __slots__ = ("_kernel", "_params", "_dtype", "_device_index", "_kernels")

    def __init__(self, x: torch.Tensor, kernel: FakeQuantKernel, params: tuple):
        self._kernel = kernel
        self._params = params
        self._dtype = x.dtype
        self._device_index = x.get_device()  # an int: cheaper to read and compare than x.device
        self._kernels: dict[tuple, object] = {}  # FakeQuantKernel.launch_bound's look-ups

    def takes(self, x: torch.Tensor) -> bool:
        return _bound_launch_takes(x, self._dtype, self._device_index, self._kernel.unit)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.takes(x):
            return None
        return self._kernel.launch_bound(x, self._params, self._device_index, self._kernels)


def _bound_launch_takes(x: torch.Tensor, dtype: torch.dtype, device_index: int, unit: int) -> bool:
    """Whether a launch bound for `dtype` on CUDA device `device_index` takes x (_launch_takes)."""
    return x.dtype is dtype and x.get_device() == device_index and _launch_takes(x, unit)


def _launch_takes(x: torch.Tensor, unit: int) -> bool:
    """Whether one launch of a fake-quant kernel of ours (FakeQuantKernel) takes x as it lies:
    not 0-d or empty, last dim a multiple of the kernel's unit, rows in memory (_rows_in_memory),
    outside autograd (no requires_grad under grad mode) and outside torch.compile's tracing."""
    return not (
        x.ndim == 0
        or x.shape[-1] % unit
        or x.numel() == 0
        or not (x.is_contiguous() or _rows_in_memory(x))
        or (x.requires_grad and torch.is_grad_enabled())
        or torch.compiler.is_compiling()
    )


def _rows_in_memory(x: torch.Tensor) -> bool:
    """Whether x's elements fill one stretch of memory, no gaps and no overlaps (a permutation of
    a contiguous tensor's dims), with the last dim innermost (stride 1). Then a kernel may read x,
    and write an output of the same strides (torch.empty_like keeps them), as consecutive rows of
    the last dim in memory order: FP8 is element by element, and NVFP4's blocks of 16 lie within
    a row. Dims of size 1 have no say (their stride is never used)."""
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        return False
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda dim: dim[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _bound_kernel_launch(format: str, x: torch.Tensor, amax: torch.Tensor, flavor: Flavor) -> BoundKernelLaunch | None:
    """The BoundKernelLaunch for x and this 0-d amax, or None where x does not take one. Either
    kernel reads the amax from the device at every launch (no value of it is kept on the host)."""
    if not x.is_cuda or x.dtype not in BoundKernelLaunch.DTYPES:
        return None
    if format == "fp8":
        from . import fp8_fake_triton

        return BoundKernelLaunch(x, fp8_fake_triton.fake_quant_kernel(flavor), (amax,))
    if not _takes_triton_block_step(x):
        return None
    from . import nvfp4_fake_triton

    return BoundKernelLaunch(x, nvfp4_fake_triton.fake_quant_kernel(), (amax,))


class BoundSliceLaunch:
    """A fake quantization of stacks of slices under one amax a slice (the experts' weights of
    refquant.quant.quantizer.SliceQuantizers' kept binding), bound as BoundKernelLaunch binds a
    per-tensor one: one launch of the kernel's per-slice variant, the launch the ordinary call
    makes (_fake_quant_slices), for contiguous stacks of slices of the shape, dtype and CUDA device
    it was bound for, with the amaxes (contiguous, one a slice) given at each call and read where
    they live. For any other x it returns None and the caller makes the ordinary call. Made by
    bind_slice_fake_quant."""

    __slots__ = ("_kernel", "_slice_shape", "_dtype", "_device_index", "_kernels")

    def __init__(self, x: torch.Tensor, kernel: FakeQuantKernel):
        self._kernel = kernel
        self._slice_shape = x.shape[1:]
        self._dtype = x.dtype
        self._device_index = x.get_device()
        self._kernels: dict[tuple, object] = {}  # FakeQuantKernel.launch_bound's look-ups

    def __call__(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor | None:
        if not (x.shape[1:] == self._slice_shape and x.is_contiguous()
                and _bound_launch_takes(x, self._dtype, self._device_index, self._kernel.unit)
                and amax.dtype in _AMAX_DTYPES and amax.get_device() == self._device_index and amax.is_contiguous()
                and amax.numel() == x.shape[0]):
            return None
        return self._kernel.launch_bound(x, (amax,), self._device_index, self._kernels)


def bind_slice_fake_quant(format: str, x: torch.Tensor, *, flavor: Flavor = "modelopt-cpu") -> BoundSliceLaunch | None:
    """The fake quantization of `format` under one amax a slice, bound for stacks of slices like
    x (slices along dim 0) as one launch of the kernel's per-slice variant (BoundSliceLaunch):
    CUDA, bf16 or fp16, contiguous, NVFP4's last dim a multiple of 16, each slice a whole number
    of the kernel's programs. None elsewhere: the caller makes the ordinary call. A bad flavor
    raises the ValueError of the ordinary call."""
    if format not in ("fp8", "nvfp4") or _is_degenerate(x) or x.ndim < 2:
        return None
    check_flavor(flavor)
    if not (x.is_cuda and x.dtype in BoundKernelLaunch.DTYPES and x.is_contiguous()):
        return None
    if format == "nvfp4" and not _takes_triton_block_step(x):
        return None
    kernel_of = _slice_kernels(format, flavor)
    programs_per_slice = _whole_programs_per_slice(kernel_of, x)
    return BoundSliceLaunch(x, kernel_of(programs_per_slice)) if programs_per_slice else None


@functools.lru_cache(maxsize=64)
def _constant_amax(value: float, device: torch.device) -> torch.Tensor:
    """One fp32 0-d tensor per constant amax (448 for the cast KV modes) and device, shared by
    every binding of it and every call given that number: what as_amax_tensor makes of the
    number, made once. Only read, never written."""
    return torch.full((), value, dtype=torch.float32, device=device)


def bind_fake_quant(format: str, x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu") -> BoundKernelLaunch | None:
    """The fake quantization of `format` ("fp8" or "nvfp4") under this per-tensor amax (a float or
    a 0-d tensor), bound for tensors like x as one launch of a Triton kernel of ours
    (BoundKernelLaunch): with a bf16 or fp16 x on CUDA that the launch takes. None where there is
    nothing to bind (no amax, a per-channel amax, a degenerate x, the CPU, another dtype, an
    unknown format): the caller makes the ordinary call. A tensor amax is bound as the tensor
    itself, never as values computed from it: every launch reads it where it lives, so a write to
    it in place (`.data` included) is used by the next call, as by the reference. A bad amax or
    flavor raises the ValueError of the ordinary call."""
    if _is_degenerate(x) or format not in ("fp8", "nvfp4"):
        return None
    check_flavor(flavor)
    if amax is None:
        return None
    constant = not isinstance(amax, torch.Tensor)
    amax = as_amax_tensor(amax, x)
    if amax.ndim != 0:
        return None
    if constant:
        amax = _constant_amax(float(amax), amax.device)
    launch = _bound_kernel_launch(format, x, amax, flavor)
    # Only a launch that takes x itself: a binding that refuses the tensor it was made for would
    # send every call back to the ordinary call, which binds again.
    return launch if launch is not None and launch.takes(x) else None


def nvfp4_quantize(x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu") -> NVFP4Tensor:
    """refquant.nvfp4_quantize through torch.compile; an NVFP4Tensor whose dequantize is compiled."""
    if _is_degenerate(x):
        quantized = reference_nvfp4.nvfp4_quantize(x, amax, flavor=flavor)
        return NVFP4Tensor(quantized.packed, quantized.block_scale, quantized.global_scale, quantized.shape, quantized.dtype)
    check_flavor(flavor)
    check_float_input(x)
    if amax is not None:
        amax = as_amax_tensor(amax, x)
    if not _takes_triton_block_step(x):
        quantized = _run(_compiled_nvfp4_quantize, reference_nvfp4.nvfp4_quantize, _rows(x), amax, flavor=flavor)
        packed, block_scale, global_scale = quantized.packed, quantized.block_scale, quantized.global_scale
    elif amax is not None and not torch.compiler.is_compiling():
        # one launch of our kernel, past the graph around it (its guards, inductor's wrapper and
        # launcher chain; refquant.compiled.triton_launch): the export's calls, and do_bench's
        from .nvfp4_triton import nvfp4_quantize_from_amax_now

        global_amax = reference_nvfp4.resolve_global_amax(x, amax)
        packed, block_scale, global_scale = nvfp4_quantize_from_amax_now(_rows(x).contiguous(), global_amax, flavor == "modelopt-cpu")
        global_scale = global_scale.reshape(())
    else:
        # the amax from x (the graph fuses its reduction), or inside a user's torch.compile
        compiled = _nvfp4_quantize_with_triton_blocks()
        packed, block_scale, global_scale = _run(compiled, reference_nvfp4.nvfp4_quantize, _rows(x), amax, flavor=flavor)
    lead = x.shape[:-1]
    return NVFP4Tensor(
        packed=packed.reshape(*lead, -1),
        block_scale=block_scale.reshape(*lead, -1),
        global_scale=global_scale,
        shape=x.shape,
        dtype=x.dtype,
    )


def _nvfp4_quantize_triton_blocks(x: torch.Tensor, amax: AmaxLike = None, *, flavor: Flavor = "modelopt-cpu"):
    """refquant.nvfp4_quantize's (packed bytes, block scales, global scale), with its block step
    (refquant.numerics.nvfp4.nvfp4_quantize_blocks) run by the Triton kernel of nvfp4_triton.py:
    CUDA, last dim a multiple of 16. The global amax is the reference's own code; the kernel
    computes the global scale from it (global_scale_from_amax), so a given amax costs one launch."""
    from .nvfp4_triton import nvfp4_quantize_from_amax

    packed, block_scale, global_scale = nvfp4_quantize_from_amax(x.contiguous(), reference_nvfp4.resolve_global_amax(x, amax), flavor == "modelopt-cpu")
    return packed, block_scale, global_scale.reshape(())


@functools.cache
def _nvfp4_quantize_with_triton_blocks() -> CompiledPerSignature:
    """The compiled _nvfp4_quantize_triton_blocks, made on first use (Triton is imported only then:
    CPU-only installs have no Triton)."""
    return _compiled(_nvfp4_quantize_triton_blocks)

