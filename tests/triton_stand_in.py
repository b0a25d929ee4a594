"""A stand-in for the part of Triton the fast kernel launch touches, for the CPU tests of
refquant.compiled.triton_launch and refquant.compiled.private_api.

It models Triton 3.6's interface, not its compiler:
- StandInJITFunction is a JITFunction as DirectLaunch uses it: `fn` (the kernel's Python signature)
  and `kernel[grid](*args, **kwargs)`, which is `run(*args, grid=grid, warmup=False, **kwargs)`:
  bind every argument to the signature, compute the specialization of each by a rule (Triton
  3.6's by default), compile once per (specialization, options), call the compiled kernel's
  launcher with every bound argument (constexprs included, as JITFunction.run does), and return
  the compiled kernel.
- StandInCompiledKernel is a CompiledKernel: `function`, `packed_metadata`, and `run`, the
  launcher: (grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
  launch_enter_hook, launch_exit_hook, *arguments). Like the C launcher it rejects a wrong
  argument count with TypeError and ignores the values passed for constexprs (the kernel has its
  own). Its "kernel" is refquant's FP8 fake quant of x under amax, written into y for the
  elements the grid covers, in memory order; launched on arguments of another specialization
  than it was compiled for, it writes other bits, as a kernel compiled for aligned loads does on
  unaligned memory.
- StandInKnobs: triton.knobs' launch hooks (chains, as in 3.6), debug and instrumentation mode.
The variants below change one thing each, as a new Triton could: a launcher that raises, one with
another leading argument, one that reads the grid in another order, one that launches nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from types import SimpleNamespace
from typing import Any, Callable

import torch

import refquant as rq

ELEMENTS = 64  # the elements one program of the stand-in kernel handles


def stand_in_fp8_kernel(x_ptr, amax_ptr, y_ptr, n, RECIPROCAL_THEN_MULTIPLY, ELEMENTS):
    """The signature of the stand-in kernel, laid out as refquant's fake-quant kernels are:
    x, params, y, count, then the constexprs."""


CONSTEXPRS = ("RECIPROCAL_THEN_MULTIPLY", "ELEMENTS")


def constants(flavor: str = "modelopt-cpu") -> dict[str, Any]:
    return {"RECIPROCAL_THEN_MULTIPLY": flavor == "modelopt-cpu", "ELEMENTS": ELEMENTS}


def triton_36_specialization(value: Any) -> tuple:
    """What Triton 3.6 specializes a runtime argument on: a tensor's dtype and whether its address
    is a multiple of 16; an int's width, whether it is 1, whether it is a multiple of 16."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    return ("i32" if -(2**31) <= value < 2**31 else "i64", value == 1, value % 16 == 0)


def stricter_specialization(value: Any) -> tuple:
    """A rule a later Triton could have: addresses by their alignment up to 128 bytes, ints by
    their residue modulo 64."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 128)
    return ("i32" if -(2**31) <= value < 2**31 else "i64", value == 1, value % 64)


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """t's elements in the order they lie in memory (t covers one stretch of memory)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class StandInCompiledKernel:
    """A compiled kernel of one specialization (see the module docstring)."""

    LEADING = ("grid_x", "grid_y", "grid_z", "stream", "function", "packed_metadata", "launch_metadata",
               "launch_enter_hook", "launch_exit_hook")

    def __init__(self, jit: StandInJITFunction, specialization: tuple, constexprs: dict[str, Any], options: dict):
        self.jit = jit
        self.specialization = specialization
        self.constexprs = constexprs
        self.function = object()  # the loaded module's function handle
        self.packed_metadata = (options.get("num_warps", 4), 1, 0)

    def run(self, *launch_arguments) -> None:
        leading = dict(zip(self.LEADING, launch_arguments))
        arguments = launch_arguments[len(self.LEADING):]
        if len(launch_arguments) < len(self.LEADING) or len(arguments) != len(self.jit.parameters):
            raise TypeError(f"launch() takes {len(self.LEADING) + len(self.jit.parameters)} arguments, got {len(launch_arguments)}")
        if leading["function"] is not self.function or leading["packed_metadata"] is not self.packed_metadata:
            raise ValueError("the launcher was given another kernel's function handle or metadata")
        self.jit.launcher_calls += 1
        self.execute(leading, arguments)

    def execute(self, leading: dict, arguments: tuple) -> None:
        programs = leading["grid_x"]  # the kernel indexes its work by program_id(0) alone
        x, amax, y, n = arguments[:4]  # the constexpr values passed are ignored, as by Triton's launcher
        covered = min(n, programs * self.constexprs["ELEMENTS"])
        flavor = "modelopt-cpu" if self.constexprs["RECIPROCAL_THEN_MULTIPLY"] else "modelopt-cuda"
        result = rq.fp8_fake_quant(_in_memory_order(x)[:covered], amax, flavor=flavor)
        if tuple(map(self.jit.specialize, arguments[:4])) != self.specialization:
            result = (result.view(torch.int16) ^ 1).view(result.dtype)  # compiled for other arguments
        _in_memory_order(y)[:covered] = result


class RaisingCompiledKernel(StandInCompiledKernel):
    """A launcher that raises for a call without launch metadata (as the fast launch makes them)
    once `fails_after` such calls went through (0: at once): a convention it checks at run time."""

    fails_after = 0

    def execute(self, leading: dict, arguments: tuple) -> None:
        if leading["launch_metadata"] is None and self.jit.fast_launches > self.fails_after:
            raise RuntimeError("the stand-in launcher failed")
        super().execute(leading, arguments)


class ExtraArgumentCompiledKernel(StandInCompiledKernel):
    """A launcher that takes one more leading argument (as when Triton added its scratch buffers)."""

    LEADING = StandInCompiledKernel.LEADING + ("profile_scratch",)


class GridOrderChangedCompiledKernel(StandInCompiledKernel):
    """A launcher that takes its grid as (z, y, x): the same argument count, another meaning."""

    LEADING = ("grid_z", "grid_y", "grid_x") + StandInCompiledKernel.LEADING[3:]


class MetadataLaunchedCompiledKernel(StandInCompiledKernel):
    """A launcher that launches through its launch metadata: given None, nothing runs."""

    def execute(self, leading: dict, arguments: tuple) -> None:
        if leading["launch_metadata"] is not None:
            super().execute(leading, arguments)


class StandInJITFunction:
    """A JITFunction as DirectLaunch uses it (see the module docstring). Counts its compiles, its
    public launches (kernel[grid](...)) and every call of a compiled kernel's launcher."""

    def __init__(self, fn: Callable = stand_in_fp8_kernel, compiled_kernel: type = StandInCompiledKernel,
                 specialize: Callable[[Any], tuple] = triton_36_specialization, knobs: Any = None):
        self.fn = fn
        self.signature = inspect.signature(fn)
        self.parameters = list(self.signature.parameters)
        self.compiled_kernel = compiled_kernel
        self.specialize = specialize
        self.knobs = knobs
        self.cache: dict[tuple, StandInCompiledKernel] = {}
        self.compiles = 0
        self.public_launches = 0
        self.launcher_calls = 0

    def __getitem__(self, grid: tuple) -> Callable:
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

    def run(self, *args, grid: tuple, warmup: bool, **kwargs) -> StandInCompiledKernel:
        options = {name: kwargs.pop(name) for name in ("num_warps", "enable_fp_fusion") if name in kwargs}
        bound = self.signature.bind(*args, **kwargs)
        constexprs = {name: bound.arguments[name] for name in CONSTEXPRS}
        runtime = [bound.arguments[name] for name in self.parameters if name not in CONSTEXPRS]
        key = (tuple(map(self.specialize, runtime)), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        kernel = self.cache.get(key)
        if kernel is None:
            kernel = self.cache[key] = self.compiled_kernel(self, key[0], constexprs, options)
            self.compiles += 1
        self.public_launches += 1
        hooks = self.knobs.runtime if self.knobs is not None else None
        if hooks is not None:
            hooks.launch_enter_hook({"name": self.fn.__name__})
        leading = {"grid_x": grid[0], "grid_y": 1, "grid_z": 1, "stream": 0, "function": kernel.function,
                   "packed_metadata": kernel.packed_metadata, "launch_metadata": {"name": self.fn.__name__},
                   "launch_enter_hook": None, "launch_exit_hook": None, "profile_scratch": None}
        kernel.run(*[leading[name] for name in kernel.LEADING], *bound.arguments.values())
        return kernel

    @property
    def fast_launches(self) -> int:
        """Launcher calls that did not come from kernel[grid](...)."""
        return self.launcher_calls - self.public_launches


class HookChain:
    """triton.knobs.HookChain: hooks called in order; `calls` empty means none."""

    def __init__(self):
        self.calls: list[Callable] = []

    def __call__(self, *args, **kwargs) -> None:
        for call in self.calls:
            call(*args, **kwargs)


def stand_in_knobs() -> SimpleNamespace:
    return SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=HookChain(), launch_exit_hook=HookChain(), debug=False),
                           compilation=SimpleNamespace(instrumentation_mode=""))


def stand_in_internals(knobs: SimpleNamespace) -> SimpleNamespace:
    """What refquant.compiled.private_api.kernel_launch_internals returns, for CPU tensors: the
    knobs, stream 0, the CPU's device index (-1) as the current device, and a device guard that
    does nothing."""
    return SimpleNamespace(knobs=knobs, raw_stream=lambda device: 0, current_device=lambda: -1,
                           device_guard=lambda device: contextlib.nullcontext())


def empty_like_at_512_bytes(empty_like: Callable) -> Callable:
    """torch.empty_like for a contiguous tensor as CUDA's caching allocator places it: at a
    multiple of 512 bytes (the CPU's allocator places a tensor at any multiple of 64, so a key that
    holds addresses would change from call to call). Other tensors: `empty_like` itself."""

    def aligned(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not t.is_contiguous() or t.device.type != "cpu":
            return empty_like(t, *args, **kwargs)
        spare = 512 // t.element_size()
        buffer = torch.empty(t.numel() + spare, dtype=t.dtype)
        start = (-buffer.data_ptr() % 512) // t.element_size()
        return buffer[start: start + t.numel()].view(t.shape)

    return aligned
