"""The kernel table as a pytest-benchmark suite: each operation of benchmarks/gpu_report.py on one
bf16 tensor per shape, by implementation (refquant.compiled, the eager reference, modelopt's and
torchao's own kernels where they import), one benchmark group per shape and operation.

pytest-benchmark times each call (synchronized on a GPU). extra_info holds what gpu_report.py
reports, measured the same way in the same run: on a GPU the ratio to a device copy of the same
tensor end to end (do_bench) and in kernel time (torch.profiler), and for refquant's rows the
elements whose bits differ from the eager reference on the same device. On a CPU it runs on a
tiny tensor for the bits only; the peers' rows are CUDA kernels and skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gpu_report
import ptq_gpu
import pytest
import torch

import refquant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLEMENTATIONS = ("compiled", "eager", "modelopt", "torchao")


def pytest_generate_tests(metafunc) -> None:
    if "shape_name" in metafunc.fixturenames:
        shapes = [s for s in metafunc.config.getoption("--kernel-shapes").split(",") if s]
        unknown = sorted(set(shapes) - set(gpu_report.SHAPES))
        if unknown:
            raise pytest.UsageError(f"--kernel-shapes: unknown {unknown}; use {', '.join(gpu_report.SHAPES)}")
        metafunc.parametrize("shape_name", shapes, scope="module")


@dataclass
class KernelInputs:
    """One shape's tensor, amax, the device copy it is measured against (CUDA) and the peers."""

    shape_name: str
    x: torch.Tensor
    amax: torch.Tensor
    copy: dict = field(default_factory=dict)
    peers: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        rows, cols = gpu_report.SHAPES[self.shape_name]
        return f"{self.shape_name} {rows}x{cols}"


@pytest.fixture(scope="module")
def inputs(shape_name, request, tables) -> KernelInputs:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(*gpu_report.SHAPES[shape_name], generator=generator) * 3).to(torch.bfloat16).to(DEVICE)
    found = KernelInputs(shape_name, x, x.abs().amax().float())
    if DEVICE == "cuda":
        clone = lambda: x.clone()  # noqa: E731
        found.copy = {"ms": gpu_report.bench_ms(clone), "ratio": 1.0, "device_ms": gpu_report.device_ms(clone),
                      "device_ratio": 1.0}
        ptq_gpu.modelopt_available()  # puts the pulp stand-in in place where pulp is missing
        found.peers = gpu_report.peers(x, found.amax, request.config.getoption("--modelopt-fp8-extension"))
    tables["kernels"].setdefault(shape_name, {}).update(
        copy=dict(found.copy), peers_notes={k: v for k, v in found.peers.items() if not callable(v)}
    )
    return found


def synchronized(call):
    if DEVICE != "cuda":
        return call

    def run():
        out = call()
        torch.cuda.synchronize()
        return out

    return run


def test_device_copy(benchmark, inputs):
    benchmark.group = f"kernels {inputs.label} copy"
    benchmark.extra_info.update(shape=inputs.label, operation="copy", implementation="torch", device=DEVICE, **inputs.copy)
    benchmark(synchronized(lambda: inputs.x.clone()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("operation", list(gpu_report.OPERATIONS))
def test_kernel(benchmark, inputs, operation, implementation, tables):
    reference_call = gpu_report.OPERATIONS[operation]
    columns: dict = {}
    if implementation in ("compiled", "eager"):
        module = refquant.compiled if implementation == "compiled" else refquant
        call = lambda: reference_call(module, inputs.x, inputs.amax)  # noqa: E731
        if implementation == "compiled":  # also compiles it, before anything is timed
            columns["differing_vs_eager"] = gpu_report.differing(call(), reference_call(refquant, inputs.x, inputs.amax))
    else:
        if DEVICE != "cuda":
            pytest.skip(f"{implementation}'s row is its CUDA kernel")
        call = inputs.peers.get(operation if implementation == "modelopt" else f"{operation}_torchao")
        if not callable(call):
            notes = {k: v for k, v in inputs.peers.items() if not callable(v)}
            pytest.skip(f"no {implementation} kernel for {operation} here {notes or ''}".strip())
    if DEVICE == "cuda":
        ms, device_ms = gpu_report.bench_ms(call), gpu_report.device_ms(call)
        columns.update(ms=ms, ratio=gpu_report.ratio(operation, inputs.copy["ms"], ms), device_ms=device_ms,
                       device_ratio=gpu_report.ratio(operation, inputs.copy["device_ms"], device_ms))
    # gpu_report.py's row layout: compiled's columns bare, the others' prefixed with their name
    prefix = "" if implementation == "compiled" else f"{implementation}_"
    tables["kernels"][inputs.shape_name].setdefault(operation, {}).update(
        {(k if k == "differing_vs_eager" else prefix + k): v for k, v in columns.items()}
    )
    benchmark.group = f"kernels {inputs.label} {operation}"
    benchmark.extra_info.update(shape=inputs.label, operation=operation, implementation=implementation, device=DEVICE,
                                **columns)
    benchmark(synchronized(call))
