"""The inductor settings under which torch.compile gives the reference's bits (docs/compiled.md).

They are passed as torch.compile(options=...), so they apply to refquant's compiled functions
only: no global inductor setting is changed.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import torch

from . import private_api


def division_rounding_option() -> str:
    """The name of inductor's "divide like eager" switch in the installed torch.

    Without it a float32 `a / b` (and torch.reciprocal, lowered as 1 / b) becomes Triton's `/`,
    the approximate div.full.f32 (up to 2 ulp off); with it, div_rn (IEEE). torch 2.13 files it
    under eager_numerics; older releases spell it emulate_divison_rounding (sic).
    """
    inductor_config = private_api.inductor_config()
    if hasattr(inductor_config, "eager_numerics") and hasattr(inductor_config.eager_numerics, "division_rounding"):
        return "eager_numerics.division_rounding"
    return "emulate_divison_rounding"


# NVFP4: a long elementwise chain (the E2M1 rounding, the packing) belongs in the kernel that reduces
# the blocks; inductor's default of 30 cut it into a kernel of its own with a uint8 buffer between.
REALIZE_OPCOUNT_THRESHOLD = 200
# FP8: the per-tensor scales (a reciprocal of the amax, a product, a second reciprocal) are 0-d
# values broadcast over x; inlined, each thread of the big kernel recomputes them (two IEEE
# divisions). With a low threshold they are computed once, in a one-element kernel. On an H100
# the FP8 kernel runs at the copy's time with it (0.179 ms at 8192 x 16384).
FP8_REALIZE_OPCOUNT_THRESHOLD = 1


def inductor_options(realize_opcount_threshold: int = REALIZE_OPCOUNT_THRESHOLD) -> dict[str, bool | int]:
    """Options for torch.compile(..., options=...) that keep every rounding step of the reference.

    - division rounding: IEEE division and reciprocal (see division_rounding_option).
    - emulate_precision_casts: keep each written `.to(bfloat16 / float16)` rounding inside a fused
      kernel (inductor otherwise elides a downcast followed by an upcast: FP8QTensor's two
      roundings of x / scale collapse into one), and turn off Triton's mul+add -> fma contraction.
    - compile_threads 1 (speed, not bits): inductor compiles our small graphs in this process.
      With more, its first compile starts a pool of worker processes (one a CPU core, each
      importing torch), and on an H200's host the first quantized model of a process then ran
      its forward 1.5x slower (0.6B: 20.1 ms against 13.0 for the same recipe later in the
      process), the host sharing its cores with the starting workers.
    - realize_opcount_threshold (speed, not bits): a pointwise value used more than once, or
      broadcast, whose computation has more ops than this is computed once into a buffer instead
      of being recomputed by each consumer. Inductor's default is 30; see the two values above.
    """
    options: dict[str, bool | int] = {division_rounding_option(): True, "emulate_precision_casts": True, "compile_threads": 1}
    if hasattr(private_api.inductor_config(), "realize_opcount_threshold"):
        options["realize_opcount_threshold"] = realize_opcount_threshold
    return options


# dynamo keeps at most `recompile_limit` graphs per function (8 by default). One reference function
# legitimately needs more (3 dtypes x 2 flavors x amax given / computed / per channel). torch >= 2.13
# takes the limit per compiled function (checked only when a new graph is compiled, so calls cost
# nothing extra); with older releases a call that hits the global limit is retried with the global
# limit raised for that one call (refquant.compiled.functions._run).
RECOMPILE_LIMIT = 64
LIMIT_PER_FUNCTION = "recompile_limit" in inspect.signature(torch.compile).parameters


def compile_reference(fn, realize_opcount_threshold: int = REALIZE_OPCOUNT_THRESHOLD):
    """torch.compile(fn) as refquant.compiled runs it: one graph (fullgraph), sizes made dynamic by
    the caller's marks, our inductor options, our recompile limit where torch takes one. Every
    call goes through dynamo, which checks the graphs' guards and compiles where none passes."""
    kwargs = {"fullgraph": True, "dynamic": None, "options": inductor_options(realize_opcount_threshold)}
    if LIMIT_PER_FUNCTION:
        kwargs["recompile_limit"] = RECOMPILE_LIMIT
    return torch.compile(fn, **kwargs)


def recompile_limit_patch():
    """For torch without per-function limits: the global limit raised while the block runs."""
    return private_api.recompile_limit_patch(RECOMPILE_LIMIT)


class CompiledPerSignature:
    """compile_reference(fn), made once per call signature (what makes dynamo compile another graph
    anyway: devices, dtypes, ranks, the static last dim on CUDA, flavor and the other options).

    On every call dynamo checks the guards of a function's graphs one after another until one
    matches, so a function holding many graphs costs more host time per call. On the H100's host,
    NVFP4 real quant at 8192 x 16384 bf16 (kernel 0.120 ms) went from 0.129 to 0.187 ms a call end
    to end once 48 other graphs of the same function existed. dynamo keeps graphs per code object,
    so each signature compiles a copy of fn with a code object of its own (_own_code_copy) and
    checks about one graph's guards. Row counts are not in the signature: they are dynamic, one
    graph for all.
    """

    def __init__(self, fn, realize_opcount_threshold: int = REALIZE_OPCOUNT_THRESHOLD):
        self.fn = fn
        self.realize_opcount_threshold = realize_opcount_threshold
        self._compiled: dict[tuple, object] = {}

    def for_call(self, args: tuple, kwargs: dict):
        key = (tuple(map(_signature, args)), tuple([(name, _signature(value)) for name, value in sorted(kwargs.items())]))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = compile_reference(_own_code_copy(self.fn), self.realize_opcount_threshold)
            self._compiled[key] = compiled
        return compiled


_PLAIN_VALUES = (str, int, float, bool, type(None), torch.dtype)


def _signature(value):
    """A hashable summary of an argument that leaves out what dynamo treats as dynamic (row counts)."""
    if isinstance(value, _PLAIN_VALUES):  # first: the common case, and the cheapest
        return value
    if isinstance(value, torch.Tensor):
        # the device with its index: a model split over GPUs gets a compile per GPU, so a call
        # checks one graph's guards, not every GPU's in turn
        return (value.device, value.dtype, value.ndim, value.shape[-1] if value.is_cuda and value.ndim else None)
    if isinstance(value, torch.Size):
        return ("size", len(value), value[-1] if value else None)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,) + tuple(_signature(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value


def _own_code_copy(fn):
    """fn with a code object of its own (same body, globals, defaults and closure)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy
