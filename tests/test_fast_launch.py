"""refquant.compiled's fast kernel launch and its public fallback (refquant.compiled.private_api).

What must hold: a fast kernel launch takes the kernel `kernel[grid](...)` picked for its key and
never a kernel compiled for other arguments, whatever Triton's specialization rules; its first
fast launch is checked against the public path; anything that goes wrong (a launcher that raises,
one whose signature changed, one that writes other bits, a private API missing, untested
versions, REFQUANT_FAST_LAUNCH=0) sends that call and every later one through the public path,
with the public path's bits and at most one warning. Nothing outside private_api touches a
private API, and the docs show the versions it declares.

On the CPU the Triton side is a stand-in (tests/triton_stand_in.py: Triton 3.6's JITFunction and
CompiledKernel interface) put into private_api where its real counterpart is looked up; the code
under test is refquant's own. On CUDA the same properties are checked against Triton itself.
"""

from __future__ import annotations

import io
import logging
import re
import tokenize
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, cuda
from triton_stand_in import (
    ELEMENTS,
    StandInCompiledKernel,
    ExtraArgumentCompiledKernel,
    GridOrderChangedCompiledKernel,
    MetadataLaunchedCompiledKernel,
    RaisingCompiledKernel,
    StandInJITFunction,
    constants,
    empty_like_at_512_bytes,
    stand_in_internals,
    stand_in_knobs,
    stricter_specialization,
    triton_36_specialization,
)

import refquant as rq
import refquant.compiled as rc
from refquant.compiled import functions, private_api, triton_launch
from refquant.compiled.private_api import (
    KERNEL_LAUNCH,
    SETTING,
    RefquantFastLaunchMismatch,
    RefquantFastLaunchWarning,
)
from refquant.compiled.triton_launch import DirectLaunch, FakeQuantKernel
from refquant.testing import assert_bitexact


@pytest.fixture
def fast_launch_undecided(monkeypatch):
    """The fast launch undecided at the start, REFQUANT_FAST_LAUNCH unset; afterwards as it was
    (the rest of the test session keeps its compiled kernels)."""
    monkeypatch.delenv(SETTING, raising=False)
    on, warned = KERNEL_LAUNCH.on, KERNEL_LAUNCH._warned
    monkeypatch.setattr(private_api, "_launcher", private_api._launcher)
    private_api.forget_decisions()
    yield
    KERNEL_LAUNCH.on, KERNEL_LAUNCH._warned = on, warned


@pytest.fixture
def knobs(monkeypatch, fast_launch_undecided):
    """The stand-in Triton in private_api, on a tested (torch, Triton) pair, and outputs placed as
    on CUDA (empty_like_at_512_bytes); the stand-in's knobs."""
    knobs = stand_in_knobs()
    monkeypatch.setattr(private_api, "kernel_launch_internals", lambda: stand_in_internals(knobs))
    monkeypatch.setattr(private_api, "installed_versions", lambda: ("2.11", "3.6"))
    monkeypatch.setattr(torch, "empty_like", empty_like_at_512_bytes(torch.empty_like))
    return knobs


def _bound(jit: StandInJITFunction, x: torch.Tensor, amax: torch.Tensor, flavor: str = "modelopt-cpu") -> functions.BoundKernelLaunch:
    kernel = FakeQuantKernel.of(jit, constants(flavor), 4, unit=1, per_program=ELEMENTS)
    return functions.BoundKernelLaunch(x, kernel, (amax,))


def _input(elements: int = 200, seed: int = 0) -> torch.Tensor:
    return (torch.randn(elements, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16).reshape(1, -1)


AMAX = torch.tensor(2.5)


def _warnings_of(caught: list, category: type) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def _calls(call, x: torch.Tensor, times: int, label: str) -> None:
    """`times` calls of call(x), each with the reference's bits."""
    want = rq.fp8_fake_quant(x, AMAX)
    for i in range(times):
        assert_bitexact(call(x), want, f"{label}, call {i}")


# --- the fast kernel launch, with the stand-in Triton ------------------------------------------


def test_a_bound_launch_checks_its_first_fast_launch_then_launches_fast(knobs):
    jit = StandInJITFunction(knobs=knobs)
    bound = _bound(jit, _input(), AMAX)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(bound, _input(), 5, "steady")
    assert _warnings_of(caught, Warning) == []
    assert KERNEL_LAUNCH.on and bound._kernel.launch.checked
    # call 1: kernel[grid]; call 2: kernel[grid] into fresh outputs, then the fast launch checked
    # against it; calls 3-5: the fast launch alone
    assert (jit.compiles, jit.public_launches, jit.fast_launches) == (1, 2, 4)


def _unbound(jit: StandInJITFunction):
    kernel = FakeQuantKernel.of(jit, constants(), 4, unit=1, per_program=ELEMENTS)
    return lambda x: kernel(x, (AMAX,))


@pytest.mark.parametrize("call_kind", ["bound", "unbound"])
@pytest.mark.parametrize("fails_after", [0, 2], ids=["at its first fast launch", "at a later one"])
def test_a_launcher_that_raises_gives_the_public_bits_one_warning_and_the_public_path_from_then_on(knobs, monkeypatch, fails_after,
                                                                                                   call_kind):
    jit = StandInJITFunction(compiled_kernel=RaisingCompiledKernel, knobs=knobs)
    monkeypatch.setattr(RaisingCompiledKernel, "fails_after", fails_after)
    call = _bound(jit, _input(), AMAX) if call_kind == "bound" else _unbound(jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(call, _input(), 6, "a launcher that raises")
        fast_before = jit.fast_launches
        other = StandInJITFunction(knobs=knobs)  # another kernel: off for the whole process
        _calls(_bound(other, _input(), AMAX), _input(), 3, "another kernel after the failure")
    messages = _warnings_of(caught, RefquantFastLaunchWarning)
    assert len(messages) == 1 and "RuntimeError: the stand-in launcher failed" in messages[0], messages
    assert KERNEL_LAUNCH.on is False
    assert jit.fast_launches == fast_before == fails_after + 1, "a fast launch after the failure"
    assert other.fast_launches == 0 and other.public_launches == 3


def test_a_launcher_whose_signature_changed_gives_the_public_bits_and_one_warning(knobs):
    jit = StandInJITFunction(compiled_kernel=ExtraArgumentCompiledKernel, knobs=knobs)
    bound = _bound(jit, _input(), AMAX)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(bound, _input(), 5, "a launcher with another argument")
    messages = _warnings_of(caught, RefquantFastLaunchWarning)
    assert len(messages) == 1 and "TypeError" in messages[0], messages
    assert KERNEL_LAUNCH.on is False and jit.fast_launches == 0 and jit.public_launches == 5


@pytest.mark.parametrize("check_bytes", [None, 256], ids=["checked whole", "checked on a prefix"])
@pytest.mark.parametrize("compiled_kernel", [GridOrderChangedCompiledKernel, MetadataLaunchedCompiledKernel],
                         ids=["reads the grid in another order", "launches nothing without metadata"])
def test_a_fast_launch_that_writes_other_bits_is_an_error_and_the_public_bits_are_returned(knobs, compiled_kernel, caplog,
                                                                                           check_bytes, monkeypatch):
    if check_bytes is not None:
        monkeypatch.setattr(triton_launch, "CHECK_BYTES", check_bytes)  # below x's 518 bytes
    jit = StandInJITFunction(compiled_kernel=compiled_kernel, knobs=knobs)
    x = _input(4 * ELEMENTS + 3)  # five programs
    bound = _bound(jit, x, AMAX)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.ERROR, logger="refquant.compiled"):
        warnings.simplefilter("always")
        _calls(bound, x, 4, compiled_kernel.__name__)
    mismatches = _warnings_of(caught, RefquantFastLaunchMismatch)
    assert len(mismatches) == 1 and "y_ptr" in mismatches[0], mismatches
    assert _warnings_of(caught, RefquantFastLaunchWarning) == []
    assert [r.levelno for r in caplog.records if r.name == "refquant.compiled"] == [logging.ERROR]
    assert KERNEL_LAUNCH.on is False and jit.fast_launches == 1 and not bound._kernel.launch.checked


class CountingCompiledKernel(StandInCompiledKernel):
    """The stand-in kernel, recording each launch as (count, whether kernel[grid] launched it)."""

    def execute(self, leading: dict, arguments: tuple) -> None:
        self.jit.launches.append((arguments[3], leading["launch_metadata"] is not None))
        super().execute(leading, arguments)


def _counting_jit(knobs) -> StandInJITFunction:
    jit = StandInJITFunction(compiled_kernel=CountingCompiledKernel, knobs=knobs)
    jit.launches = []
    return jit


@pytest.mark.parametrize("call_kind", ["bound", "unbound"])
def test_a_first_fast_launch_larger_than_check_bytes_is_checked_on_a_prefix_of_its_arguments(knobs, monkeypatch, call_kind):
    """Its check copies at most CHECK_BYTES: the check runs on a launch over the first 248 of x's
    1000 elements (a count with 1000's residue modulo 16, 496 bytes of output), then x's own
    launch is fast, with the reference's bits."""
    monkeypatch.setattr(triton_launch, "CHECK_BYTES", 512)
    jit = _counting_jit(knobs)
    x = _input(1000)
    call = _bound(jit, x, AMAX) if call_kind == "bound" else _unbound(jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(call, x, 4, "checked on a prefix")
    assert _warnings_of(caught, Warning) == []
    public, fast = True, False
    # call 1: kernel[grid]; call 2: the prefix's kernel[grid], its check (kernel[grid] into fresh
    # outputs, then the fast launch), then x's fast launch; calls 3-4: fast
    assert jit.launches == [(1000, public), (248, public), (248, public), (248, fast), (1000, fast), (1000, fast), (1000, fast)]
    assert KERNEL_LAUNCH.on and jit.compiles == 1  # the prefix has x's specialization


def test_a_launch_with_no_smaller_count_of_its_specialization_is_checked_whole(knobs, monkeypatch):
    """A count whose residue modulo 16 does not fit CHECK_BYTES (here 8 elements) has no prefix
    launch with its specialization: the check compares the whole outputs, as below CHECK_BYTES."""
    monkeypatch.setattr(triton_launch, "CHECK_BYTES", 16)
    jit = _counting_jit(knobs)
    x = _input(1001)  # 1001 % 16 = 9 > 8
    _calls(_bound(jit, x, AMAX), x, 3, "checked whole")
    assert jit.launches == [(1001, True), (1001, True), (1001, False), (1001, False)]
    assert KERNEL_LAUNCH.on


@pytest.mark.parametrize("versions", [("2.12", "3.6"), ("2.13", "3.7"), ("2.11", "3.7"), ("2.11", None)])
def test_outside_the_tested_versions_every_launch_is_public_with_one_warning(knobs, monkeypatch, versions):
    monkeypatch.setattr(private_api, "installed_versions", lambda: versions)
    jit = StandInJITFunction(knobs=knobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(_bound(jit, _input(), AMAX), _input(), 4, f"torch {versions[0]}, Triton {versions[1]}")
    messages = _warnings_of(caught, RefquantFastLaunchWarning)
    assert len(messages) == 1 and f"{SETTING}=1" in messages[0] and "torch 2.11 with Triton 3.6" in messages[0], messages
    assert jit.fast_launches == 0 and jit.public_launches == 4


def test_refquant_fast_launch_0_keeps_every_launch_public_without_a_warning(knobs, monkeypatch):
    monkeypatch.setenv(SETTING, "0")
    jit = StandInJITFunction(knobs=knobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(_bound(jit, _input(), AMAX), _input(), 4, f"{SETTING}=0")
    assert _warnings_of(caught, Warning) == []
    assert KERNEL_LAUNCH.on is False and jit.fast_launches == 0 and jit.public_launches == 4


def test_refquant_fast_launch_1_turns_it_on_outside_the_tested_versions_still_checked(knobs, monkeypatch):
    monkeypatch.setenv(SETTING, "1")
    monkeypatch.setattr(private_api, "installed_versions", lambda: ("2.99", "9.0"))
    jit = StandInJITFunction(knobs=knobs)
    bound = _bound(jit, _input(), AMAX)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(bound, _input(), 4, f"{SETTING}=1")
    assert _warnings_of(caught, Warning) == []
    assert KERNEL_LAUNCH.on and bound._kernel.launch.checked and jit.fast_launches == 3


def test_a_bad_refquant_fast_launch_value_is_an_error_that_names_it(knobs, monkeypatch):
    monkeypatch.setenv(SETTING, "yes")
    with pytest.raises(ValueError, match=f"{SETTING}='yes'.*{SETTING}=0"):
        _bound(StandInJITFunction(knobs=knobs), _input(), AMAX)(_input())


def test_a_missing_private_api_turns_the_fast_launch_off_with_one_warning(knobs, monkeypatch):
    def missing():
        raise ImportError("cannot import name 'knobs' from 'triton'")

    monkeypatch.setattr(private_api, "kernel_launch_internals", missing)
    jit = StandInJITFunction(knobs=knobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls(_bound(jit, _input(), AMAX), _input(), 3, "no knobs")
    messages = _warnings_of(caught, RefquantFastLaunchWarning)
    assert len(messages) == 1 and "cannot import name 'knobs'" in messages[0]
    assert jit.fast_launches == 0


@pytest.mark.parametrize("specialize", [triton_36_specialization, stricter_specialization], ids=["triton 3.6's rule", "a stricter rule"])
def test_a_bound_launch_never_runs_a_kernel_compiled_for_other_arguments(knobs, specialize):
    """The stand-in's kernels write other bits when launched on arguments of another
    specialization than their own. Over counts of 1, multiples of 16 and 64 and others, and x at
    0, 8, 16, 48 and 128 bytes into its memory, in turn and again: the reference's bits every
    call, under Triton 3.6's rule and under one keyed on alignments up to 128 bytes and counts
    modulo 64 (a key that holds less than the exact count and the address modulo 256 fails it)."""
    jit = StandInJITFunction(specialize=specialize, knobs=knobs)
    storage = _input(8192 + 64, seed=3).reshape(-1)
    bound = _bound(jit, storage[:16].reshape(1, -1), AMAX)
    cases = [(count, offset) for count in (1, 16, 17, 64, 65, 128, 200) for offset in (0, 4, 8, 24, 64)]
    for count, offset in cases + cases[::-1] + cases:
        x = storage[offset: offset + count].reshape(1, -1)
        assert_bitexact(bound(x), rq.fp8_fake_quant(x, AMAX), f"{count} elements, {2 * offset} bytes in")
    assert jit.fast_launches > len(cases), "the fast launch was not exercised"


def test_a_write_to_the_amax_through_data_launches_a_kernel_for_its_new_dtype(knobs):
    """`.data =` gives the same amax tensor object another dtype and address, and moves no version
    counter: the bound launch's key holds both."""
    jit = StandInJITFunction(knobs=knobs)
    amax = torch.tensor(2.5)
    x = _input()
    bound = _bound(jit, x, amax)
    for value, dtype in ((2.5, torch.float32), (0.75, torch.bfloat16), (6.0, torch.float16), (2.5, torch.float32)):
        amax.data = torch.tensor(value, dtype=dtype)
        for i in range(3):
            assert_bitexact(bound(x), rq.fp8_fake_quant(x, amax), f"amax {value} {dtype}, call {i}")
    assert jit.fast_launches > 0


@pytest.mark.parametrize("knob", ["launch hook", "debug", "instrumentation"])
def test_while_a_launch_hook_or_a_debug_knob_is_set_every_launch_is_public(knobs, knob):
    jit = StandInJITFunction(knobs=knobs)
    x = _input()  # one tensor throughout: another's address may fall in another key (mod 256)
    bound = _bound(jit, x, AMAX)
    _calls(bound, x, 3, "before")
    entered = []
    if knob == "launch hook":
        knobs.runtime.launch_enter_hook.calls.append(entered.append)
    elif knob == "debug":
        knobs.runtime.debug = True
    else:
        knobs.compilation.instrumentation_mode = "consan"
    fast, public = jit.fast_launches, jit.public_launches
    _calls(bound, x, 3, f"under {knob}")
    assert (jit.fast_launches, jit.public_launches) == (fast, public + 3)
    if knob == "launch hook":
        assert len(entered) == 3
    knobs.runtime.launch_enter_hook.calls.clear()
    knobs.runtime.debug, knobs.compilation.instrumentation_mode = False, ""
    _calls(bound, x, 2, "after")
    assert jit.fast_launches == fast + 2 and KERNEL_LAUNCH.on


def test_a_direct_launch_names_outputs_among_its_runtime_parameters(knobs):
    with pytest.raises(ValueError, match="outputs"):
        DirectLaunch(StandInJITFunction(knobs=knobs), constants(), 4, outputs=("out_ptr",))
    with pytest.raises(ValueError, match="constexprs must be its last parameters"):
        DirectLaunch(StandInJITFunction(knobs=knobs), {"RECIPROCAL_THEN_MULTIPLY": True}, 4, outputs=("y_ptr",))


# --- what binds a launch (CPU: no kernel runs) ----------------------------------------------------


def test_a_launch_takes_a_permutation_of_a_contiguous_tensor_with_the_last_dim_innermost():
    """What BoundKernelLaunch reads in place besides contiguous tensors (functions._rows_in_memory):
    the layouts whose elements fill one stretch of memory as rows of the last dim."""
    base = torch.empty(2, 8, 4, 32)
    takes = {
        "contiguous": base,
        "K and V without a KV cache": base.transpose(1, 2),
        "the leading dims permuted": base.permute(2, 0, 1, 3),
        "a size-1 dim with any stride": torch.empty(4, 1, 32).as_strided((4, 1, 32), (32, 7, 1)),
    }
    refuses = {
        "the last dim not innermost": base.transpose(2, 3),
        "a slice of each row": base[..., :16],
        "every other row": base[:, ::2],
        "an expanded dim (stride 0)": torch.empty(1, 32).expand(4, 32),
        "overlapping rows": torch.empty(80).as_strided((4, 32), (16, 1)),
    }
    for what, x in takes.items():
        assert functions._rows_in_memory(x), what
    for what, x in refuses.items():
        assert not functions._rows_in_memory(x), what


def test_bind_fake_quant_binds_nothing_it_cannot_launch_and_refuses_a_bad_amax():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    rc.fp8_fake_quant(x, torch.ones(1, 64), flavor="modelopt-cpu")
    assert rc.bind_fake_quant("fp8", x, torch.ones(1, 64)) is None, "a per-channel amax"
    assert rc.bind_fake_quant("fp8", torch.randn(0, 64), 1.0) is None, "an empty x"
    assert rc.bind_fake_quant("int8", x, 1.0) is None, "an unknown format"
    assert rc.bind_fake_quant("nvfp4", x, None) is None, "no amax (taken from each x)"
    assert rc.bind_fake_quant("fp8", x, torch.tensor(2.0)) is None, "the CPU"
    with pytest.raises(ValueError, match="amax"):
        rc.bind_fake_quant("fp8", x, -1.0)


# --- one module holds every private API, and the docs show what it declares -----------------------

PRIVATE_API = [r"torch\._C\b", r"torch\._dynamo\b", r"torch\._inductor\b", r"torch\._functorch\b", r"torch\._guards\b",
               r"_DeviceGuard\b", r"\bknobs\b", r"\.run\(", r"\bpacked_metadata\b"]
# Public-ish uses allowed outside private_api, each with its reason.
ALLOWED = {
    ("compiled/functions.py", r"torch\._dynamo\.maybe_mark_dynamic\("):
        "torch.compiler's dynamic-shapes guide documents it as the way to mark a dim dynamic",
    ("compiled/functions.py", r"torch\._dynamo\.mark_static\("):
        "documented with it, to keep a dim static",
}
HOME = "compiled/private_api.py"
# comments and string literals (Python 3.12 splits an f-string into tokens: its literal parts are text)
_NOT_CODE = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def _code_lines(path: Path) -> list[str]:
    """The file's lines with every comment and string literal (docstrings included) blanked."""
    lines = path.read_text().splitlines()
    blank = [list(line) for line in lines]
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type not in _NOT_CODE:
            continue
        (row, col), (end_row, end_col) = token.start, token.end
        for r in range(row, end_row + 1):
            first = col if r == row else 0
            last = end_col if r == end_row else len(blank[r - 1])
            blank[r - 1][first:last] = " " * (last - first)
    return ["".join(chars) for chars in blank]


def private_api_uses(root: Path) -> list[str]:
    """Every use of a PRIVATE_API pattern in the code of `root` (a refquant tree) outside
    private_api.py and ALLOWED, as "file:line: text"."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative == HOME:
            continue
        for number, line in enumerate(_code_lines(path), start=1):
            for (file, allowed) in ALLOWED:
                if file == relative:
                    line = re.sub(allowed, " ", line)
            if any(re.search(pattern, line) for pattern in PRIVATE_API):
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_no_private_api_is_used_outside_the_private_api_module():
    uses = private_api_uses(REPO / "refquant")
    assert not uses, f"private torch / Triton APIs outside refquant/{HOME}:\n" + "\n".join(uses)


def test_the_private_api_check_finds_each_kind_of_use(tmp_path):
    root = tmp_path / "refquant"
    files = {
        HOME: "import torch\nfrom triton import knobs\nstream = torch._C._cuda_getCurrentRawStream(0)\n",
        "compiled/functions.py": ("import torch\n"
                                  "torch._dynamo.maybe_mark_dynamic(t, 0)\n"
                                  "torch._dynamo.mark_static(t, 1)\n"
                                  "torch._dynamo.mark_dynamic(t, 0)\n"),
        "compiled/launch.py": ('"""Calls compiled.run( and knobs (a docstring)."""\n'
                               "# torch._C in a comment\n"
                               "from triton import knobs\n"
                               "compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata)\n"
                               "with torch.cuda._DeviceGuard(0):\n"
                               "    import torch._inductor.config as config\n"
                               "message = 'torch._guards in a string'\n"
                               "graph.outputs(frame)\n"),
        "quant/backends.py": "import torch._functorch.config\nfrom torch._guards import CompileContext\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert private_api_uses(root) == [
        "compiled/functions.py:4: torch._dynamo.mark_dynamic(t, 0)",
        "compiled/launch.py:3: from triton import knobs",
        "compiled/launch.py:4: compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata)",
        "compiled/launch.py:5: with torch.cuda._DeviceGuard(0):",
        "compiled/launch.py:6: import torch._inductor.config as config",
        "quant/backends.py:1: import torch._functorch.config",
        "quant/backends.py:2: from torch._guards import CompileContext",
    ]


def _docs_version_table() -> list[tuple[str, ...]]:
    """The rows of docs/compiled.md's table of tested versions (the one whose header starts with
    "| torch | Triton |")."""
    lines = (REPO / "docs" / "compiled.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| torch | Triton |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip().strip("|").split("|")))
    return rows


def test_the_docs_show_the_versions_the_fast_launch_declares():
    declared = [(r.torch, r.triton, "on" if r.kernel_launch else "off", r.tested_on) for r in private_api.TESTED]
    assert _docs_version_table() == declared


# --- CUDA: against Triton itself --------------------------------------------------------------


def _bound_kernel(fmt: str, flavor: str):
    from refquant.compiled import fp8_fake_triton, nvfp4_fake_triton

    return fp8_fake_triton.fake_quant_kernel(flavor) if fmt == "fp8" else nvfp4_fake_triton.fake_quant_kernel()


def _reference(fmt: str, flavor: str):
    if fmt == "fp8":
        return lambda x, amax: rq.fp8_fake_quant(x, amax, flavor=flavor)
    return rq.nvfp4_fake_quant


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt, flavor", [("fp8", "modelopt-cpu"), ("fp8", "modelopt-cuda"), ("nvfp4", "modelopt-cuda")],
                         ids=["fp8 modelopt-cpu", "fp8 modelopt-cuda", "nvfp4"])
def test_every_specialization_the_fast_launch_keys_on_gives_the_public_bits(fmt, flavor, dtype):
    """Counts of 1, 16, 17 and 4096, x at 0, 8, 16, 48 and 128 bytes into its memory, and K/V's
    transposed layout: a bound launch's calls (the key's first, through kernel[grid], then the
    fast launch) give the bits of Triton's own kernel[grid](...) on the same x and the CPU
    reference's, and the kernel the launch keeps for a key is the object kernel[grid] returns."""
    kernel = _bound_kernel(fmt, flavor)
    reference = _reference(fmt, flavor)
    unit = kernel.unit
    storage = (torch.randn(4096 * unit + 64, generator=torch.Generator().manual_seed(9)) * 3).to(dtype).cuda()
    amax = torch.tensor(2.5, device="cuda")
    bound = rc.bind_fake_quant(fmt, storage[: 16 * unit].view(-1, unit), amax, flavor=flavor)
    assert isinstance(bound, functions.BoundKernelLaunch)
    cases = {f"{count} counts, {offset} bytes in": storage[offset // 2: offset // 2 + count * unit].view(count, unit)
             for count in (1, 16, 17, 4096) for offset in (0, 8, 16, 48, 128)}
    for offset in (0, 8):
        memory = storage[offset // 2: offset // 2 + 2 * 8 * 4 * 32]
        cases[f"K/V layout, {offset} bytes in"] = memory.view(2, 8, 4, 32).transpose(1, 2)
    same_key = 0
    for label, x in list(cases.items()) + list(cases.items())[::-1]:
        want = reference(x.cpu(), amax.cpu())
        for call in range(2):
            y = bound(x)
            assert y is not None and y.stride() == x.stride(), label
            assert_bitexact(y.cpu(), want, f"{label}, call {call}")
        programs, args, key = kernel.arguments(x, (amax,))
        picked = kernel.launch.launch_public(programs, x.get_device(), args)
        assert_bitexact(args[-2].cpu(), want, f"{label}: kernel[grid](...)")
        # the same key as the bound calls' wherever this y lies as theirs did modulo 256 bytes
        kept = bound._kernels.get(key)
        assert kept is None or kept is picked, f"{label}: the bound launch keeps another kernel than Triton picks"
        assert kernel.launch._compiled.get(kernel.launch.key_of(args)) in (None, picked), f"{label}: another kernel"
        same_key += kept is picked
    assert KERNEL_LAUNCH.on and kernel.launch.checked, "the fast launch fell back"
    assert same_key >= len(cases), f"only {same_key} look-ups compared with Triton's pick"


@cuda
@pytest.mark.parametrize("per_slice", [False, True], ids=["one amax", "an amax per slice"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_kernels_first_fast_launch_checked_on_a_prefix_gives_the_reference_bits(fmt, per_slice, fast_launch_undecided,
                                                                                  monkeypatch):
    """A fresh launch of each fake-quant kernel (as expert weights take it: one amax, or one a
    slice) whose outputs exceed CHECK_BYTES: its check runs on a prefix, passes, and every call
    gives the CPU reference's bits, fast from the second call on."""
    from refquant.compiled import fp8_fake_triton, nvfp4_fake_triton

    monkeypatch.setattr(triton_launch, "CHECK_BYTES", 8192)
    module = fp8_fake_triton if fmt == "fp8" else nvfp4_fake_triton
    unit = 1 if fmt == "fp8" else 16
    x = (torch.randn(4, 64, 4096 // 64 * unit + unit, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    x = x[:, :, :-unit].contiguous()  # 4 slices of 4096 counts: programs lie in one slice each
    amax = torch.tensor([1.5, 2.5, 4.0, 0.5])
    one = module.fake_quant_kernel("modelopt-cuda") if fmt == "fp8" else module.fake_quant_kernel()
    programs_per_slice = 4096 // one.per_program if per_slice else 0
    constants = (fp8_fake_triton.kernel_constants("modelopt-cuda", programs_per_slice) if fmt == "fp8"
                 else nvfp4_fake_triton.kernel_constants(programs_per_slice))
    kernel = FakeQuantKernel.of(one.launch.kernel, constants, one.launch.num_warps, unit=unit, per_program=one.per_program)
    fake = (lambda t, a: rq.fp8_fake_quant(t, a, flavor="modelopt-cuda")) if fmt == "fp8" else rq.nvfp4_fake_quant
    if per_slice:
        want = torch.stack([fake(x[i], amax[i]) for i in range(4)])
        params = (amax.cuda(),)
    else:
        want = fake(x, amax[1])
        params = (amax[1].cuda(),)
    for call in range(3):
        assert_bitexact(kernel(x.cuda(), params).cpu(), want, f"call {call}")
    assert KERNEL_LAUNCH.on and kernel.launch.checked


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nvfp4_real_quant_launched_fast_gives_the_reference_bits_at_every_alignment_and_count(dtype):
    amax = torch.tensor(2.5, device="cuda")
    storage = (torch.randn(4096 * 16 + 64, generator=torch.Generator().manual_seed(10)) * 3).to(dtype)
    on_device_storage = storage.cuda()
    for count in (1, 16, 17, 4096):
        for offset in (0, 8, 16, 48, 128):
            x = storage[offset // 2: offset // 2 + count * 16].view(count, 16)
            on_device = on_device_storage[offset // 2: offset // 2 + count * 16].view(count, 16)
            for flavor in ("modelopt-cpu", "modelopt-cuda"):
                want = rq.nvfp4_quantize(x, amax.cpu(), flavor=flavor)
                for call in range(2):
                    assert_bitexact(rc.nvfp4_quantize(on_device, amax, flavor=flavor), want,
                                    f"{count} blocks, {offset} bytes in, {flavor}, call {call}")
    assert KERNEL_LAUNCH.on, "the fast launch fell back"


@cuda
@pytest.mark.parametrize("recipe", ["fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv", "nvfp4_default-fp8_kv"])
def test_a_forced_fallback_ptq_gives_the_fast_launchs_amax_logits_and_export(recipe, fast_launch_undecided, monkeypatch, tmp_path):
    """A tiny Llama's PTQ on CUDA with the fast launch (as installed) and with REFQUANT_FAST_LAUNCH=0:
    the same amax in every quantizer, the same logits (a first and a steady forward, with and
    without a KV cache), byte-identical exports; and only the first run launched fast."""
    from conftest import folder_files, tiny_llama

    from refquant.quant.quantizer import named_quantizers

    fast_launches = []
    launch_compiled_kernel = private_api.launch_compiled_kernel

    def counting(*args, **kwargs):
        fast_launches.append(1)
        return launch_compiled_kernel(*args, **kwargs)

    monkeypatch.setattr(private_api, "launch_compiled_kernel", counting)
    runs = {}
    for setting in ("as installed", "0"):
        if setting == "0":
            monkeypatch.setenv(SETTING, "0")
        private_api.forget_decisions()
        fast_launches.clear()
        model = tiny_llama().cuda()
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5)).cuda()
        rq.quantize_model(model, rq.load_recipe(recipe), [ids], backend="compiled", flavor="modelopt-cuda", progress=False)
        with torch.no_grad():
            logits = [model(input_ids=ids, use_cache=use_cache).logits.cpu() for use_cache in (True, False, True)]
        amax = {name: (None if q.amax is None else q.amax.cpu()) for name, q in named_quantizers(model)}
        export = folder_files(rq.export_checkpoint(model, tmp_path / setting.replace(" ", "_")))
        runs[setting] = (amax, logits, export, len(fast_launches))
    (amax, logits, export, launched), (amax_off, logits_off, export_off, launched_off) = runs["as installed"], runs["0"]
    assert amax.keys() == amax_off.keys()
    for name in amax:
        if amax[name] is None:
            assert amax_off[name] is None, name
        else:
            assert_bitexact(amax_off[name], amax[name], name)
    for i, (got, want) in enumerate(zip(logits_off, logits)):
        assert_bitexact(got, want, f"logits of forward {i}")
    assert export_off == export, "the exports differ"
    assert launched > 0 and launched_off == 0, (launched, launched_off)


def test_alignment_is_the_address_triton_tests_not_the_offset_into_the_storage():
    """The bf16-pairs path of NVFP4 real quant needs x 16-byte aligned as Triton sees a pointer:
    by address. A storage need not start aligned (torch.frombuffer), so the storage offset alone
    would say aligned where the address is not."""
    from refquant.compiled.triton_launch import starts_aligned

    raw = torch.frombuffer(bytearray(256), dtype=torch.uint8)
    lead = -raw.data_ptr() % 16  # bytes to the first 16-byte boundary
    for offset in range(16):
        x = raw[lead + offset: lead + offset + 64]
        assert starts_aligned(x, 16) == (offset == 0), offset
        assert starts_aligned(x, 2) == (offset % 2 == 0), offset
    # a storage that itself starts 2 bytes past a boundary: offset 0 into it, yet not aligned
    buffer = bytearray(256)
    base = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    skew = (2 - base) % 16
    unaligned_start = torch.frombuffer(memoryview(buffer)[skew:], dtype=torch.uint8)
    assert unaligned_start.storage_offset() == 0 and unaligned_start.data_ptr() % 16 == 2
    assert not starts_aligned(unaligned_start, 16)


def test_alignment_of_a_fake_tensor_under_tracing_is_its_storage_offset():
    """Under torch.compile's tracing (NVFP4 real quant's triton_op body runs on fake tensors) there
    is no address: the storage offset decides, as inductor assumes an offset-aligned input aligned."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from refquant.compiled.triton_launch import starts_aligned

    with FakeTensorMode():
        storage = torch.empty(64, dtype=torch.bfloat16)
        for offset in range(9):
            assert starts_aligned(storage[offset:], 16) == (offset % 8 == 0), offset
