"""Our Triton kernels launched eagerly with little host work: Triton's own launcher, called with a
kernel compiled before.

Why: a bound FP8 or NVFP4 fake quantizer's call (refquant.compiled.functions.BoundKernelLaunch) is
one kernel of ours. Going through the compiled graph around it costs dynamo's guards, inductor's
wrapper and its launcher chain, about 25-35 us a call on the H200 machines' hosts; Triton's `kernel[grid](...)`
costs more (about 38 us: binding and specializing every argument, constexprs included, and
checking the kernel's globals on each call; run M in docs/compiled.md). A host-bound PTQ forward
pays that ~100 times.

How (`DirectLaunch`): Triton compiles a kernel once per specialization of its arguments (their
dtypes; whether each pointer is 16-byte aligned; whether each integer is 1, a multiple of 16, and
fits in 32 bits; the device; the constexprs and compile options). A DirectLaunch has fixed
constexprs and options and keys what it compiled by the same properties of the other arguments.
A key's first launch goes through `kernel[grid](...)`, which compiles or finds the kernel and
returns it; later launches call that kernel's launcher directly, as Triton does, with every
argument in signature order. tests/test_triton_launch.py checks on CUDA that a key's kernel is
the one Triton itself picks for the same arguments. A caller that knows which arguments can
change (a bound quantizer: only the count and the alignments) may keep the kernel `launch`
returned and call `launch_compiled` with it, past the key. Launch hooks (a profiler such as
proton) send every launch through `kernel[grid](...)`, which calls them. Kernels are compiled without
FMA contraction (enable_fp_fusion=False): every rounding is the one written in the kernel.
What this relies on beyond Triton's public API is what inductor's own launchers use: a compiled
kernel's `run`, `function` and `packed_metadata` (Triton 3.6), and torch's current raw stream
and device guard; the CUDA tests exercise it on every supported pair of versions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from triton import knobs

_INT32 = range(-(2**31), 2**31)


def _scalar_specialization(arg: Any) -> tuple:
    """What Triton specializes a kernel on for one int or float argument (a tensor's, its dtype and
    whether its pointer is 16-byte aligned, is in DirectLaunch.key_of)."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return (arg == 1, arg % 16 == 0, arg in _INT32)
    if isinstance(arg, float):
        return (float,)  # an fp32 argument; Triton does not specialize on a float's value
    raise TypeError(f"DirectLaunch takes tensors, ints and floats as runtime arguments, got {type(arg).__name__}.")


class DirectLaunch:
    """kernel[(programs,)](*args, **constants, num_warps=num_warps) with the host work of Triton's
    launcher alone once a kernel for the arguments' specialization exists (see the module
    docstring). Runtime arguments come first in the kernel's signature, constexprs after; the
    tensors live on one CUDA device, the first argument's."""

    def __init__(self, kernel, constants: dict[str, Any], num_warps: int):
        self.kernel = kernel
        self.constants = constants
        self.num_warps = num_warps
        names = list(inspect.signature(kernel.fn).parameters)
        self._runtime_count = len(names) - len(constants)
        if sorted(names[self._runtime_count :]) != sorted(constants):
            raise ValueError(f"{kernel.fn.__name__}: the constexprs must be its last parameters, got {sorted(constants)}.")
        self._constant_values = tuple(constants[name] for name in names[self._runtime_count :])
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, programs: int, *args) -> None:
        self.launch(programs, args)

    def launch(self, programs: int, args: tuple) -> Any:
        """Launches the kernel on `args` (runtime arguments in signature order) over `programs`
        programs; returns the compiled kernel it launched, which a caller may keep and hand to
        launch_compiled for later arguments of the same specialization (key_of)."""
        if len(args) != self._runtime_count:
            raise TypeError(f"{self.kernel.fn.__name__} takes {self._runtime_count} runtime arguments, got {len(args)}.")
        key = self.key_of(args)
        device = key[0]
        compiled = self._compiled.get(key)
        if compiled is None or launch_hooks_set():
            with torch.cuda._DeviceGuard(device):  # Triton launches on the current device
                compiled = self._compiled[key] = self.kernel[(programs,)](
                    *args, **self.constants, num_warps=self.num_warps, enable_fp_fusion=False
                )
            return compiled
        self.launch_compiled(compiled, programs, device, args)
        return compiled

    def launch_compiled(self, compiled: Any, programs: int, device: int, args: tuple) -> None:
        """Triton's launcher alone: `compiled` must be what launch returned for arguments of the
        same specialization as `args`, on CUDA device `device`, and no launch hook set."""
        # Entering and leaving the device guard is host time on every launch, and a forward's
        # tensors are usually on the current device already (not always: a model split over GPUs).
        if torch._C._cuda_getDevice() != device:
            with torch.cuda._DeviceGuard(device):
                self._call_launcher(compiled, programs, device, args)
        else:
            self._call_launcher(compiled, programs, device, args)

    def _call_launcher(self, compiled, programs: int, device: int, args: tuple) -> None:
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled.run(programs, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *self._constant_values)

    @staticmethod
    def key_of(args: tuple) -> tuple:
        """What a compiled kernel is kept under: the first argument's device, then what Triton
        specializes on for each argument (tensors inline: a call per argument is host time on
        every launch)."""
        return (args[0].get_device(),
                *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else _scalar_specialization(a) for a in args])


def launch_hooks_set() -> bool:
    """Whether a launch hook is installed: Triton 3.6 keeps them in chains (empty: none), older
    versions as one callable or None."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


@dataclass(frozen=True)
class FakeQuantKernel:
    """How a fake-quant kernel of ours is launched on x: kernel(x, *params, y, count) over
    ceil(count / per_program) programs, y = empty_like(x), count = x.numel() // unit (what
    refquant.compiled.functions.BoundKernelLaunch calls on every bound call)."""

    launch: DirectLaunch
    unit: int  # the elements one count stands for (NVFP4: a block of 16); x's last dim is a multiple of it
    per_program: int  # the counts one program handles

    def __call__(self, x: torch.Tensor, params: tuple) -> torch.Tensor:
        """y for x, one launch through DirectLaunch's own look-up (calls that are not bound)."""
        y = torch.empty_like(x)
        count = x.numel() // self.unit
        self.launch.launch(-(-count // self.per_program), (x, *params, y, count))
        return y
