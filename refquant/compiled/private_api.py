"""Every private torch and Triton API that refquant.compiled uses, in one place, each use guarded.

refquant.compiled has two fast paths that cut host time with internals of torch and Triton. Each
has a public path that gives the same bits without them:

- the fast kernel launch (triton_launch.py): a Triton kernel of ours launched through the
  launcher of the kernel Triton compiled for the arguments, past the per-call binding of
  `kernel[grid](...)`. Public path: `kernel[grid](...)`.
- the direct graph call (direct_call.py): a graph inductor compiled, called behind dynamo's own
  guards, past dynamo's dispatch. Public path: the torch.compile'd function (dynamo).

Supported versions. A fast path is on where the installed torch and Triton are among those it
was tested on (TESTED, compared by major.minor; docs/compiled.md has the same table, and a test
checks that they agree), off elsewhere with one warning that says how to turn it on. The
environment variable REFQUANT_FAST_LAUNCH decides otherwise: 0 turns both off, 1 turns both on
whatever the versions (unset: on where tested).

Failures. A private name that is missing, a call into one that raises, or a fast launch whose
bits differ from the public path's switches that fast path off for the process: that call and
every later one take the public path, with one warning (RefquantFastLaunchWarning; a difference
in bits is also logged as an error and warned as RefquantFastLaunchMismatch). A user's forward
never fails because of a fast path and never gets other bits from one.

Why the fast kernel launch cannot give other bits than `kernel[grid](...)`:
(a) Triton compiles a kernel once per specialization of its arguments: today a pointer's dtype
    and whether its address is a multiple of 16, an integer's width and whether it is 1 or a
    multiple of 16, the device, the constexprs and the options. A fast launch looks its kernel
    up by a key at least as fine as anything Triton can specialize on for these arguments,
    whatever its rules: each integer's exact value, each pointer's dtype and address modulo 256
    (every alignment rule up to 256 bytes), the device, and constexprs and options fixed when the
    launch is made. So one key never covers two of Triton's specializations, now or after a rule
    changes within those bounds.
(b) A key's first launch goes through `kernel[grid](...)`, which compiles or finds the kernel for
    those arguments, launches it, and returns it; that very object is kept for the key. The
    kernel and its specialization come from the public path's own objects: nothing here copies
    Triton's specialization rules.
(c) What remains ours is the calling convention: the argument list handed to the compiled
    kernel's launcher. The first fast launch of each kernel in a process is checked against the
    public path bit for bit: the public path runs on the same inputs into fresh outputs, the fast
    launch writes outputs first filled with the complement of those bits (so an output it fails
    to write cannot pass), and a difference switches the fast launch off, logs an error, and
    returns the public path's bits.
A kernel is thus either launched as Triton launches it, or not launched fast at all. The direct
graph call keeps its own check (direct_call.py): a graph is called only behind dynamo's own guard
manager, and adopted only after its first direct call gave dynamo's result bit for bit.

The private APIs, by the fast path that uses them; TESTED says on which versions.
Triton (the fast kernel launch):
  - CompiledKernel.run(grid_x, grid_y, grid_z, stream, function, packed_metadata,
    launch_metadata, launch_enter_hook, launch_exit_hook, *every argument in signature order,
    constexprs included): the launcher JITFunction.run calls; CompiledKernel.function and
    .packed_metadata (Triton 3.6 runtime/jit.py, compiler/compiler.py).
  - triton.knobs.runtime.launch_enter_hook / launch_exit_hook (HookChain in 3.6; a callable or
    None before), knobs.runtime.debug and knobs.compilation.instrumentation_mode: what makes
    `kernel[grid](...)` call hooks or compile another kernel; while any is set, launches take it.
torch (the fast kernel launch):
  - torch._C._cuda_getCurrentRawStream(device), torch._C._cuda_getDevice(),
    torch.cuda._DeviceGuard(device): what Triton's own launch reads and sets, without the
    Python layers of torch.cuda.current_stream / torch.cuda.device.
torch (the direct graph call):
  - torch._dynamo.eval_frame._debug_get_cache_entry_list(code): each cache entry's
    guard_manager (its check, or its root's) and compile_id.
  - torch._guards.CompileContext.current_compile_id().
  - torch._inductor.compile_fx.compile_fx(gm, inputs, inner_compile=..., config_patches=...),
    compile_fx_inner, and its output's current_callable (inductor's generated call(args)).
  - an fx placeholder's meta["grapharg"] (source, example, pass_arg_as_tensor) and
    torch._dynamo.source.LocalSource, TensorPropertySource, TensorProperty.
  - torch._functorch.config.enable_autograd_cache.
torch (the public path of every compiled function; refquant.compiled needs them, no fallback):
  - torch._inductor.config: the names of the options in options.py, read with hasattr.
  - torch._dynamo.config.patch(recompile_limit=...) (torch without a per-function limit).
  - torch._dynamo.exc.Unsupported and FailOnRecompileLimitHit (caught, to raise the
    reference's own error or retry under a raised limit).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

SETTING = "REFQUANT_FAST_LAUNCH"


@dataclass(frozen=True)
class VersionPair:
    """One (torch, Triton) pair and which fast paths were tested on it (major.minor each)."""

    torch: str
    triton: str
    kernel_launch: bool
    graph_call: bool
    tested_on: str


# docs/compiled.md, "Fast paths: versions, switch, fallback", shows this table (a test checks it).
TESTED = (
    VersionPair("2.11", "3.6", kernel_launch=True, graph_call=True, tested_on="CUDA (H100, H200) and CPU"),
    VersionPair("2.13", "3.7", kernel_launch=False, graph_call=True, tested_on="CPU only (its CUDA build pins Triton 3.7.1)"),
)


class RefquantFastLaunchWarning(UserWarning):
    """A fast path of refquant.compiled is off (untested versions, a private API missing, or a
    failure); the public path runs instead: same bits, more host time."""


class RefquantFastLaunchMismatch(RuntimeWarning):
    """A fast kernel launch wrote other bits than the public path on the same input: the fast
    launch is off for the process and the public path's bits were returned."""


_log = logging.getLogger("refquant.compiled")


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def installed_versions() -> tuple[str, Optional[str]]:
    """(torch, Triton) installed, as major.minor; Triton is None where it does not import."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - not installed, or an install that does not import: no Triton
        return _major_minor(torch.__version__), None
    return _major_minor(torch.__version__), _major_minor(triton.__version__)


def _tested_text(path: str) -> str:
    pairs = [f"torch {r.torch} with Triton {r.triton}" if path == "kernel_launch" else f"torch {r.torch}"
             for r in TESTED if getattr(r, path)]
    return ", ".join(pairs)


class FastPath:
    """One fast path's state in this process. `on` is True (take it), False (take the public
    path), or None before the first decision (hot paths read it as off, and the slow path that
    follows decides: decide())."""

    def __init__(self, name: str, public_path: str, check: str, tested: Callable[[str, Optional[str]], bool],
                 tested_text: str, resolve: Callable[[], None]):
        self.name = name
        self.public_path = public_path
        self._check = check  # how its first use is checked against the public path
        self._tested = tested
        self._tested_text = tested_text
        self._resolve = resolve
        self.on: Optional[bool] = None
        self._warned = False

    def decide(self) -> bool:
        """Whether the fast path is on, deciding on first use from REFQUANT_FAST_LAUNCH, the
        installed versions and whether its private names are there."""
        if self.on is None:
            self.on = self._decision()
        return self.on

    def _decision(self) -> bool:
        setting = os.environ.get(SETTING, "").strip()
        if setting not in ("", "0", "1"):
            raise ValueError(
                f"{SETTING}={setting!r} (from the environment) is not a setting of refquant.compiled's fast paths; "
                f"use {SETTING}=0 (off), {SETTING}=1 (on, whatever the versions), or leave it unset (on where tested)."
            )
        if setting == "0":
            return False
        if setting == "":
            torch_version, triton_version = installed_versions()
            if not self._tested(torch_version, triton_version):
                self._warn(
                    f"refquant.compiled: {self.name} is off: it was tested on {self._tested_text}, and this is torch "
                    f"{torch_version} with Triton {triton_version or '(none)'}. {self.public_path} runs instead: same bits, "
                    f"more host time. Set {SETTING}=1 to turn it on anyway ({self._check}), or {SETTING}=0 to keep it "
                    f"off without this warning."
                )
                return False
        try:
            self._resolve()
        except Exception as error:  # noqa: BLE001 - a private name moved: the public path
            self._warn(
                f"refquant.compiled: {self.name} is off: a private API it needs is not there ({type(error).__name__}: "
                f"{error}). {self.public_path} runs instead: same bits, more host time. {SETTING}=0 silences this."
            )
            return False
        return True

    def fail(self, error: BaseException, during: str) -> None:
        """A call into a private API raised: off for the process, with one warning."""
        self.on = False
        self._warn(
            f"refquant.compiled: {self.name} failed while {during} ({type(error).__name__}: {error}); it is off for "
            f"this process and {self.public_path} runs instead: same bits, more host time. Please report this with "
            f"your torch and Triton versions; {SETTING}=0 turns the fast paths off without this warning."
        )

    def mismatch(self, what: str) -> None:
        """A fast launch gave other bits than the public path: off for the process, logged as an error."""
        self.on = False
        self._warned = True
        text = (f"refquant.compiled: {self.name} gave other bits than {self.public_path} ({what}); it is off for "
                f"this process and the public path's bits were returned. Please report this with your torch and "
                f"Triton versions.")
        _log.error(text)
        warnings.warn(text, RefquantFastLaunchMismatch, stacklevel=3)

    def forget(self) -> None:
        """Decide again on the next use (a test or benchmark that changes REFQUANT_FAST_LAUNCH)."""
        self.on = None
        self._warned = False

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(text, RefquantFastLaunchWarning, stacklevel=4)


def forget_decisions() -> None:
    """Both fast paths decide again on their next use (from REFQUANT_FAST_LAUNCH as it is then)."""
    KERNEL_LAUNCH.forget()
    GRAPH_CALL.forget()


# ---------------------------------------------------------------------------------------------
# The fast kernel launch (triton_launch.py)
# ---------------------------------------------------------------------------------------------

_launcher: Any = None  # kernel_launch_internals(), once KERNEL_LAUNCH decided on


def kernel_launch_internals() -> SimpleNamespace:
    """The private names the fast kernel launch calls, looked up now (raises ImportError or
    AttributeError where one is missing): Triton's knobs, torch's raw current stream, current
    device and device guard."""
    from triton import knobs

    for name in ("launch_enter_hook", "launch_exit_hook", "debug"):
        getattr(knobs.runtime, name)
    getattr(knobs.compilation, "instrumentation_mode")
    return SimpleNamespace(knobs=knobs, raw_stream=torch._C._cuda_getCurrentRawStream,
                           current_device=torch._C._cuda_getDevice, device_guard=torch.cuda._DeviceGuard)


def _resolve_kernel_launch() -> None:
    global _launcher
    _launcher = kernel_launch_internals()


def kernel_launch_blocked() -> bool:
    """Whether a launch must take the public path now: the fast launch is off (or not decided
    yet), or something `kernel[grid](...)` acts on is set: a launch hook (a profiler such as
    proton), Triton's debug mode or instrumentation (which compile other kernels)."""
    if not KERNEL_LAUNCH.on:
        return True
    try:
        knobs = _launcher.knobs
        runtime = knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        # A Triton 3.6 HookChain holds its hooks in `calls` (empty: none); older Tritons keep one
        # callable or None.
        return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave) or runtime.debug
                    or knobs.compilation.instrumentation_mode)
    except Exception as error:  # noqa: BLE001 - the knobs moved: the public path from now on
        KERNEL_LAUNCH.fail(error, "reading Triton's launch knobs")
        return True


def launch_compiled_kernel(compiled: Any, programs: int, device: int, arguments: tuple) -> None:
    """Launches `compiled` (what `kernel[grid](...)` returned) over `programs` programs on the
    current stream of CUDA device `device`, as JITFunction.run launches it: `arguments` are all
    of the kernel's arguments in signature order, constexprs included. No hook is passed:
    kernel_launch_blocked() said none is set. Raises what the launcher raises."""
    launcher = _launcher
    # Entering and leaving the device guard is host time on every launch, and a forward's
    # tensors are usually on the current device already (not always: a model split over GPUs).
    if launcher.current_device() != device:
        with launcher.device_guard(device):
            compiled.run(programs, 1, 1, launcher.raw_stream(device), compiled.function, compiled.packed_metadata,
                         None, None, None, *arguments)
    else:
        compiled.run(programs, 1, 1, launcher.raw_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *arguments)


def stream_capturing(device: int) -> bool:
    """Whether CUDA device `device`'s current stream is capturing a CUDA graph (no device read
    back is possible then); False for the CPU (device -1)."""
    return device >= 0 and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------
# The direct graph call (direct_call.py)
# ---------------------------------------------------------------------------------------------

_graph: Any = None  # graph_call_internals(), once GRAPH_CALL decided on


def graph_call_internals() -> SimpleNamespace:
    """The private names the direct graph call uses, looked up now (raises ImportError,
    AttributeError or TypeError where one is missing or has another form)."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource
    from torch._guards import CompileContext
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    parameters = inspect.signature(compile_fx).parameters
    if "inner_compile" not in parameters or "config_patches" not in parameters:
        raise TypeError("torch._inductor.compile_fx.compile_fx takes no inner_compile or config_patches")
    for prop in ("SIZE", "STRIDE", "STORAGE_OFFSET"):
        getattr(TensorProperty, prop)
    return SimpleNamespace(cache_entries=_debug_get_cache_entry_list, LocalSource=LocalSource,
                           TensorProperty=TensorProperty, TensorPropertySource=TensorPropertySource,
                           compile_id=CompileContext.current_compile_id, compile_fx=compile_fx,
                           compile_fx_inner=compile_fx_inner, functorch_config=functorch_config)


def _resolve_graph_call() -> None:
    global _graph
    _graph = graph_call_internals()


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: list, options: dict) -> Callable:
    """What torch.compile(backend="inductor", options=options) does with a graph dynamo traced."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=options)


def inductor_compile_keeping_outputs(gm: torch.fx.GraphModule, example_inputs: list, options: dict) -> tuple[Callable, list]:
    """inductor_compile, also returning what inductor compiled for each graph it made: a list of
    (output code, is_inference). AOTAutograd's own cache is off here: a hit would hand back a
    stored wrapper and skip inductor's inner compile (inductor's graph cache still applies)."""
    internals = _graph
    made = []

    def inner_compile(*args, **kwargs):
        output_code = internals.compile_fx_inner(*args, **kwargs)
        made.append((output_code, kwargs.get("is_inference", False)))
        return output_code

    config = internals.functorch_config
    no_cache = config.patch(enable_autograd_cache=False) if hasattr(config, "enable_autograd_cache") else contextlib.nullcontext()
    with no_cache:
        compiled = internals.compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=options)
    return compiled, made


def current_compile_id() -> str:
    """The id of the compile under way (dynamo's cache entry for the graph carries the same)."""
    return str(_graph.compile_id())


def graph_input_args(gm: torch.fx.GraphModule) -> list:
    """dynamo's record of where each graph input comes from (a GraphArg, or None), in order."""
    return [node.meta.get("grapharg") for node in gm.graph.nodes if node.op == "placeholder"]


def inference_callable(output_code: Any) -> Optional[Callable[[list], Any]]:
    """inductor's generated call(args) of an output code, or None."""
    return getattr(output_code, "current_callable", None)


def cache_entries(code: Any) -> list[tuple[Any, str]]:
    """(guard manager, compile id) of each graph dynamo keeps for a code object."""
    return [(getattr(entry, "guard_manager", None), str(getattr(entry, "compile_id", None)))
            for entry in _graph.cache_entries(code)]


def guard_check(guards: Any) -> Optional[Callable[[dict], bool]]:
    """The check dynamo runs before using a graph (the C++ one of the root, a Python frame less),
    as a callable of the function's locals; None where the guard manager has none."""
    if guards is None or not hasattr(guards, "check"):
        return None
    return getattr(guards, "root", guards).check


def graph_input_reader(graph_arg: Any) -> Optional[Callable[[dict], Any]]:
    """How to get one graph input from the function's locals (None: a source not rebuilt here)."""
    internals = _graph
    if graph_arg is None or getattr(graph_arg, "pass_arg_as_tensor", False):
        return None
    source = graph_arg.source
    if isinstance(source, internals.LocalSource):
        name = source.local_name
        return lambda frame: frame[name]
    if isinstance(source, internals.TensorPropertySource) and isinstance(source.base, internals.LocalSource):
        name, index, prop = source.base.local_name, source.idx, source.prop
        if prop == internals.TensorProperty.SIZE:
            return lambda frame: frame[name].size(index)
        if prop == internals.TensorProperty.STRIDE:
            return lambda frame: frame[name].stride(index)
        if prop == internals.TensorProperty.STORAGE_OFFSET:
            return lambda frame: frame[name].storage_offset()
        return None
    # A tensor the function reads from a global (refquant's per-device reciprocal table): dynamo
    # passes it as an input; it is the same object on every call, so the one seen here is kept.
    example = getattr(graph_arg, "example", None)
    if isinstance(example, torch.Tensor):
        return lambda frame: example
    return None


# ---------------------------------------------------------------------------------------------
# The public path of every compiled function (no fallback: refquant.compiled needs these)
# ---------------------------------------------------------------------------------------------


def inductor_config():
    """torch._inductor.config, where options.py looks up the names of its options."""
    import torch._inductor.config as config

    return config


def recompile_limit_patch(limit: int):
    """dynamo's global recompile limit raised to `limit` while the block runs."""
    return torch._dynamo.config.patch(recompile_limit=limit)


class _NeverRaised(Exception):
    """Stands in for a dynamo exception this torch does not define: nothing raises it."""


try:
    from torch._dynamo.exc import Unsupported as DynamoUnsupported
except ImportError:  # the reference's own error is then not re-raised for a bad argument: dynamo's shows
    DynamoUnsupported = _NeverRaised
try:
    from torch._dynamo.exc import FailOnRecompileLimitHit as RecompileLimitHit
except ImportError:
    RecompileLimitHit = _NeverRaised


KERNEL_LAUNCH = FastPath(
    "the fast kernel launch (Triton's launcher called directly)",
    "Triton's kernel[grid](...)",
    "each kernel's first fast launch is still checked bit for bit against kernel[grid](...)",
    lambda torch_version, triton_version: any(
        r.kernel_launch and (r.torch, r.triton) == (torch_version, triton_version) for r in TESTED),
    _tested_text("kernel_launch"),
    _resolve_kernel_launch,
)
GRAPH_CALL = FastPath(
    "the direct call of compiled graphs",
    "dynamo's own dispatch (plain torch.compile)",
    "each graph's first direct call is still checked bit for bit against dynamo's",
    lambda torch_version, triton_version: any(r.graph_call and r.torch == torch_version for r in TESTED),
    _tested_text("graph_call"),
    _resolve_graph_call,
)
