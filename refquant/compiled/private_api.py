"""Every private torch and Triton API that refquant.compiled uses, in one place, each use guarded.

refquant.compiled has one eager fast path that cuts host time with internals of Triton and torch:
the fast kernel launch (triton_launch.py), a Triton kernel of ours launched through the launcher
of the kernel Triton compiled for the arguments, past the per-call binding of `kernel[grid](...)`.
Its public path, `kernel[grid](...)`, gives the same bits. Compiled graphs are called through
torch.compile (dynamo) and nothing else.

Supported versions. The fast launch is on where the installed torch and Triton are among the
pairs it was tested on (TESTED, compared by major.minor; docs/compiled.md has the same table, and
a test checks that they agree), off elsewhere with one warning that says how to turn it on. The
environment variable REFQUANT_FAST_LAUNCH decides otherwise: 0 turns it off, 1 turns it on
whatever the versions (unset: on where tested).

Failures. A private name that is missing, a call into one that raises, or a fast launch whose
bits differ from the public path's switches the fast launch off for the process: that call and
every later one take the public path, with one warning (RefquantFastLaunchWarning; a difference
in bits is also logged as an error and warned as RefquantFastLaunchMismatch). A user's forward
never fails because of the fast launch and never gets other bits from it.

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
    returns the public path's bits. A launch whose outputs exceed triton_launch.CHECK_BYTES is
    checked on a launch of the same kernel over a prefix of its arguments (the same addresses,
    a count with the same specializations), which bounds the check's copies.
A kernel is thus either launched as Triton launches it, or not launched fast at all.

The private APIs; TESTED says on which versions the fast launch was tested.
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
torch (the alignment test of a launch, triton_launch.starts_aligned):
  - torch._subclasses.fake_tensor.is_fake(x): a tensor of torch.compile's tracing, which has no
    address (torch 2.13 warns on its data_ptr(), torch 2.11 raises). Missing: False, and the
    caller asks the tensor itself.
torch (the grouped experts' row-count checks on worker threads, refquant.hf.grouped_linear):
  - torch._C._cuda_clearCublasWorkspaces(): gives back the cuBLAS workspace of each thread's
    handle. Missing: the checks run on the calling thread alone (the workers' workspaces would
    stay allocated for the process).
torch (the public path of every compiled function; refquant.compiled needs them, no fallback):
  - torch._inductor.config: the names of the options in options.py, read with hasattr.
  - torch._dynamo.config.patch(recompile_limit=...) (torch without a per-function limit).
  - torch._dynamo.exc.Unsupported and FailOnRecompileLimitHit (caught, to raise the
    reference's own error or retry under a raised limit).
"""

from __future__ import annotations

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
    """One (torch, Triton) pair (major.minor each), whether the fast kernel launch was tested on
    it, and on which machines refquant.compiled was."""

    torch: str
    triton: str
    kernel_launch: bool
    tested_on: str


# docs/compiled.md, "The fast launch: versions, switch, fallback", shows this table (a test checks it).
TESTED = (
    VersionPair("2.11", "3.6", kernel_launch=True, tested_on="CUDA (H100, H200) and CPU"),
    VersionPair("2.13", "3.7", kernel_launch=False, tested_on="CPU only (its CUDA build pins Triton 3.7.1)"),
)


class RefquantFastLaunchWarning(UserWarning):
    """refquant.compiled's fast kernel launch is off (untested versions, a private API missing, or
    a failure); the public path runs instead: same bits, more host time."""


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


def _tested_text() -> str:
    return ", ".join(f"torch {r.torch} with Triton {r.triton}" for r in TESTED if r.kernel_launch)


class FastPath:
    """The fast path's state in this process (KERNEL_LAUNCH below). `on` is True (take it), False (take the public
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
                f"{SETTING}={setting!r} (from the environment) is not a setting of refquant.compiled's fast kernel launch; "
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
            f"your torch and Triton versions; {SETTING}=0 turns the fast launch off without this warning."
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
    """The fast launch decides again on its next use (from REFQUANT_FAST_LAUNCH as it is then)."""
    KERNEL_LAUNCH.forget()


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


def is_fake(x: torch.Tensor) -> bool:
    """Whether x is a tensor of torch.compile's tracing (a FakeTensor, or a functional tensor
    around one): no memory, no address. False where torch has no such function."""
    try:
        from torch._subclasses.fake_tensor import is_fake as fake
    except ImportError:
        return False
    return bool(fake(x))


def stream_capturing(device: int) -> bool:
    """Whether CUDA device `device`'s current stream is capturing a CUDA graph (no device read
    back is possible then); False for the CPU (device -1)."""
    return device >= 0 and torch.cuda.is_current_stream_capturing()


def release_blas_workspaces() -> bool:
    """Gives back to torch's caching allocator the cuBLAS workspace torch keeps for each (cuBLAS
    handle, stream) it has used: a thread's first cuBLAS call gets a handle of its own and a
    workspace with it (32 MiB on sm90), held for the process. torch makes a thread's workspace
    again at its next cuBLAS call, of the same size (cuBLAS has the same kernels to pick from). True
    where done; False where this torch has no torch._C._cuda_clearCublasWorkspaces, or no CUDA."""
    if not can_release_blas_workspaces():
        return False
    torch._C._cuda_clearCublasWorkspaces()
    return True


def can_release_blas_workspaces() -> bool:
    """Whether release_blas_workspaces can give them back here."""
    return hasattr(torch._C, "_cuda_clearCublasWorkspaces") and torch.cuda.is_available()


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
    _tested_text(),
    _resolve_kernel_launch,
)
