"""Our Triton kernels launched eagerly with little host work: the launcher of the kernel Triton
compiled for the arguments, called directly.

Why: a bound FP8 or NVFP4 fake quantizer's call (refquant.compiled.functions.BoundKernelLaunch) is
one kernel of ours, and a host-bound PTQ forward makes ~100 such calls. Through the compiled graph
around the kernel a call pays dynamo's guards, inductor's wrapper and its launcher chain; through
Triton's `kernel[grid](...)` it pays the binding and specialization of every argument, constexprs
included, and the check of the kernel's globals. Triton's launcher alone costs a fraction of
either.

How (DirectLaunch): a key's first launch goes through `kernel[grid](...)`, which compiles or finds
the kernel for those arguments and returns it; that kernel is kept under a key at least as fine as
anything Triton can specialize on (refquant.compiled.private_api, (a) and (b)). Later launches of
the key call its launcher directly, as Triton does, with every argument in signature order; the
first such launch of each DirectLaunch in a process is checked bit for bit against
`kernel[grid](...)` (private_api, (c)); where that launch's outputs are larger than CHECK_BYTES,
the check is made on a launch of the same kernel over a prefix of them (FakeQuantKernel's), so a
check never holds a second copy of an expert group's weights. A launch hook (a profiler such as
proton) or Triton's debug knobs, the fast launch turned off (untested versions,
REFQUANT_FAST_LAUNCH=0) or any failure of it send launches through `kernel[grid](...)`. Kernels
are compiled without FMA contraction (enable_fp_fusion=False): every rounding is the one written
in the kernel. The private APIs this calls are in refquant.compiled.private_api, and nowhere else.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import private_api

# Compiled kernels kept by key, per DirectLaunch and per bound launch. A count is in the key, so a
# KV cache growing token by token adds a key a token; past the limit the look-ups start afresh.
KEYS_KEPT = 256
BOUND_KEYS_KEPT = 32
# Every alignment a pointer's specialization could depend on, up to this many bytes (private_api, (a)).
ADDRESS_MODULUS = 256

# The most output bytes a first fast launch's check copies (the public path's fresh outputs, the
# complement, the comparison): a larger launch is checked on a prefix of its arguments, where its
# DirectLaunch knows how to make one.
CHECK_BYTES = 4 * 2**20

_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def runtime_parameters(kernel: Any, constants: dict[str, Any]) -> list[str]:
    """The names of a Triton kernel's runtime parameters: those before its constexprs, which must
    be its last parameters and exactly `constants`' keys."""
    names = list(inspect.signature(kernel.fn).parameters)
    runtime = names[: len(names) - len(constants)]
    if sorted(names[len(runtime):]) != sorted(constants):
        raise ValueError(f"{kernel.fn.__name__}: the constexprs must be its last parameters, got {sorted(constants)}.")
    return runtime


def starts_aligned(x: torch.Tensor, alignment: int) -> bool:
    """Whether x's first element lies at an address that is a multiple of `alignment` bytes, which
    is how Triton tests a pointer argument: by its address, not by the offset into its storage (a
    storage need not start aligned, e.g. one made by torch.frombuffer). Under torch.compile's
    tracing x is a fake tensor with no address: then its storage offset decides, as inductor
    decides which inputs it may assume aligned (torch's allocators align a storage's start)."""
    if not private_api.is_fake(x):
        try:
            return x.data_ptr() % alignment == 0
        except RuntimeError:  # another tensor without memory to point at
            pass
    return x.storage_offset() * x.element_size() % alignment == 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as an integer tensor of the same element size (same memory)."""
    return t.view(_SAME_SIZE_INTEGER[t.element_size()])


def _number_key(value: Any) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        return (int, value)  # the exact value: Triton specializes on properties of it (== 1, % 16, width)
    raise TypeError(f"DirectLaunch takes tensors and ints as runtime arguments, got {type(value).__name__}.")


class DirectLaunch:
    """kernel[(programs,)](*args, **constants, num_warps=num_warps, enable_fp_fusion=False) with the
    host work of Triton's launcher alone, once the key's kernel exists and this launch was checked
    (see the module docstring). Runtime arguments come first in the kernel's signature, constexprs
    after; the tensors live on one CUDA device, the first argument's. `outputs` names the
    arguments the kernel writes in full and never reads (the first fast launch's check compares
    them). `prefix`, where given, makes from a launch's (programs, arguments) a launch of the same
    kernel, with the same specializations, over a prefix of those outputs of at most CHECK_BYTES
    (or None where it cannot): the check is then made on that one."""

    def __init__(self, kernel: Any, constants: dict[str, Any], num_warps: int, outputs: tuple[str, ...],
                 prefix: Optional[Callable[[int, tuple], Optional[tuple[int, tuple]]]] = None):
        self.kernel = kernel
        self.constants = constants
        self.num_warps = num_warps
        self.name = kernel.fn.__name__
        runtime = runtime_parameters(kernel, constants)
        if not outputs or any(name not in runtime for name in outputs):
            raise ValueError(f"{self.name}: outputs {outputs} must name runtime parameters among {runtime}.")
        self._runtime = runtime
        self.output_indices = tuple(runtime.index(name) for name in outputs)
        self.prefix = prefix
        constexprs = list(inspect.signature(kernel.fn).parameters)[len(runtime):]
        self._constant_values = tuple(constants[name] for name in constexprs)
        self._compiled: dict[tuple, Any] = {}
        self.checked = False  # this launch's first fast launch gave the public path's bits

    def __call__(self, programs: int, *args) -> None:
        self.launch(programs, args)

    def launch(self, programs: int, args: tuple) -> Any:
        """Launches the kernel on `args` (runtime arguments in signature order) over `programs`
        programs. Returns the compiled kernel it launched where a caller may keep it and hand it
        to launch_compiled for later arguments of the same key (the fast launch on, and checked
        for this kernel); else None."""
        if len(args) != len(self._runtime):
            raise TypeError(f"{self.name} takes {len(self._runtime)} runtime arguments ({', '.join(self._runtime)}), got {len(args)}.")
        key = self.key_of(args)
        device = key[0]
        compiled = self._compiled.get(key)
        fast = private_api.KERNEL_LAUNCH.decide()
        if compiled is None or not fast or private_api.kernel_launch_blocked():
            compiled = self.launch_public(programs, device, args)
            if fast:
                if len(self._compiled) >= KEYS_KEPT:
                    self._compiled.clear()
                self._compiled[key] = compiled
        elif not self.checked:
            self._check_then_launch(compiled, programs, device, args)
        else:
            self.launch_compiled(compiled, programs, device, args)
        return compiled if self.checked and private_api.KERNEL_LAUNCH.on else None

    def launch_public(self, programs: int, device: int, args: tuple) -> Any:
        """Triton's public launch on CUDA device `device`; returns the compiled kernel it picked."""
        with torch.cuda.device(device):  # Triton launches on the current device
            return self.kernel[(programs,)](*args, **self.constants, num_warps=self.num_warps, enable_fp_fusion=False)

    def launch_compiled(self, compiled: Any, programs: int, device: int, args: tuple) -> None:
        """Triton's launcher alone: `compiled` must be what launch returned for arguments of the
        same key as `args`, on CUDA device `device`, and kernel_launch_blocked() false. Should the
        launcher raise, the fast launch is off for the process and this launch is the public one."""
        try:
            private_api.launch_compiled_kernel(compiled, programs, device, args + self._constant_values)
        except Exception as error:  # noqa: BLE001 - a launcher of another form: the public path
            private_api.KERNEL_LAUNCH.fail(error, f"launching {self.name}")
            self.launch_public(programs, device, args)

    def _check_then_launch(self, compiled: Any, programs: int, device: int, args: tuple) -> None:
        """The first fast launch: checked as it is, or, where its outputs exceed CHECK_BYTES and a
        prefix launch can be made, the check made on the prefix launch (its kernel found by the
        public path, as any key's first launch) and this launch then fast if it passed, else public."""
        smaller = None
        if self.prefix is not None and sum(args[i].nbytes for i in self.output_indices) > CHECK_BYTES:
            smaller = self.prefix(programs, args)
        if smaller is None:
            self._check_first_fast_launch(compiled, programs, device, args)
            return
        small_programs, small_args = smaller
        self._check_first_fast_launch(self.launch_public(small_programs, device, small_args), small_programs, device, small_args)
        if self.checked and private_api.KERNEL_LAUNCH.on:
            self.launch_compiled(compiled, programs, device, args)
        else:
            self.launch_public(programs, device, args)

    def _check_first_fast_launch(self, compiled: Any, programs: int, device: int, args: tuple) -> None:
        """The calling convention, checked once: the public path on the same inputs into fresh
        outputs, then the fast launch into `args`' outputs filled with the complement of those bits
        (so an element it does not write differs). Equal: this launch is checked. Otherwise the
        fast launch is off (an error-level warning) and `args`' outputs get the public bits."""
        if private_api.stream_capturing(device):  # no read back while a CUDA graph is captured
            self.launch_public(programs, device, args)
            return
        public_args = list(args)
        for index in self.output_indices:
            public_args[index] = torch.empty_like(args[index])
        self.launch_public(programs, device, tuple(public_args))
        outputs = [(self._runtime[i], args[i], public_args[i]) for i in self.output_indices]
        for _, out, expected in outputs:
            _bits(out).copy_(torch.bitwise_not(_bits(expected)))
        try:
            private_api.launch_compiled_kernel(compiled, programs, device, args + self._constant_values)
        except Exception as error:  # noqa: BLE001 - a launcher of another form: the public path
            private_api.KERNEL_LAUNCH.fail(error, f"launching {self.name} for the first time")
        else:
            differing = [name for name, out, expected in outputs if not torch.equal(_bits(out), _bits(expected))]
            if not differing:
                self.checked = True
                return
            private_api.KERNEL_LAUNCH.mismatch(f"{self.name}'s {', '.join(differing)} on its first fast launch")
        for _, out, expected in outputs:
            out.copy_(expected)

    @staticmethod
    def key_of(args: tuple) -> tuple:
        """What a compiled kernel is kept under (private_api, (a)): the first argument's device,
        then each tensor's dtype and address modulo ADDRESS_MODULUS and each int's value (inline:
        a call per argument is host time on every launch)."""
        return (args[0].get_device(),
                *[(a.dtype, a.data_ptr() % ADDRESS_MODULUS) if isinstance(a, torch.Tensor) else _number_key(a) for a in args])


@dataclass(frozen=True)
class FakeQuantKernel:
    """How a fake-quant kernel of ours is laid out and launched (the one place that says so):
    kernel(x, *params, y, count, *constexprs) over ceil(count / per_program) programs, where
    y = torch.empty_like(x) (x's strides: the kernel writes y in x's memory order), count =
    x.numel() // unit, and params are tensors fixed when a launch is bound (the amax)."""

    launch: DirectLaunch
    unit: int  # the elements one count stands for (NVFP4: a block of 16); x's last dim is a multiple of it
    per_program: int  # the counts one program handles

    @classmethod
    def of(cls, kernel: Any, constants: dict[str, Any], num_warps: int, *, unit: int, per_program: int) -> FakeQuantKernel:
        """The description of `kernel`, whose runtime parameters are laid out as the class says."""
        output = runtime_parameters(kernel, constants)[-2]
        prefix = functools.partial(_prefix_launch, unit=unit, per_program=per_program)
        return cls(DirectLaunch(kernel, constants, num_warps, outputs=(output,), prefix=prefix), unit, per_program)

    def arguments(self, x: torch.Tensor, params: tuple, out: Optional[torch.Tensor] = None) -> tuple[int, tuple, tuple]:
        """(programs, runtime arguments, key) for x, with a new y as arguments[-2]. The key is what
        a bound launch looks its kernel up by (launch_bound): what can change between calls of a
        binding, which fixes the dtypes, the device and the constexprs. That is the count, x's and
        y's addresses modulo ADDRESS_MODULUS, and each param's dtype and address (a write to
        `.data` changes both without a version counter); with what the binding fixes, it holds
        all of DirectLaunch.key_of. `out`, when given, is y (x's shape, dtype and strides)."""
        y = torch.empty_like(x) if out is None else out
        count = x.numel() // self.unit
        key = (count, x.data_ptr() % ADDRESS_MODULUS, y.data_ptr() % ADDRESS_MODULUS)
        for param in params:  # a loop: a comprehension is one more frame on every call
            key += (param.dtype, param.data_ptr() % ADDRESS_MODULUS)
        return -(-count // self.per_program), (x, *params, y, count), key

    def __call__(self, x: torch.Tensor, params: tuple, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y for x (written into `out` when given), one launch through DirectLaunch's own look-up
        (calls that are not bound)."""
        programs, args, _ = self.arguments(x, params, out)
        self.launch.launch(programs, args)
        return args[-2]

    def launch_bound(self, x: torch.Tensor, params: tuple, device: int, kept: dict) -> torch.Tensor:
        """y for x, for a launch bound to x's dtype and CUDA device `device` (BoundKernelLaunch
        checked x against them), its kernel looked up in `kept` by the key of `arguments`. A miss,
        and every launch while kernel_launch_blocked(), goes through DirectLaunch.launch."""
        programs, args, key = self.arguments(x, params)
        compiled = kept.get(key)
        if compiled is None or private_api.kernel_launch_blocked():
            compiled = self.launch.launch(programs, args)
            if compiled is not None:
                if len(kept) >= BOUND_KEYS_KEPT:
                    kept.clear()
                kept[key] = compiled
        else:
            self.launch.launch_compiled(compiled, programs, device, args)
        return args[-2]


def _prefix_launch(programs: int, args: tuple, *, unit: int, per_program: int) -> Optional[tuple[int, tuple]]:
    """A fake-quant kernel's launch (FakeQuantKernel's layout) over the first elements of x and y
    in memory, as x's own launch computes them: the same addresses, and a count that keeps every
    property Triton specializes an int on (its residue modulo 16, never 1, the same width), its
    output within CHECK_BYTES. None where no smaller count keeps them."""
    x, *params, y, count = args
    limit = CHECK_BYTES // (unit * y.element_size())
    smaller = (limit - count % 16) // 16 * 16 + count % 16
    if not 1 < smaller < count or count >= 2**31:
        return None
    elements = smaller * unit
    x_prefix, y_prefix = (t.as_strided((elements,), (1,)) for t in (x, y))  # memory order, from the first element
    return -(-smaller // per_program), (x_prefix, *params, y_prefix, smaller)
