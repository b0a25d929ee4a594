"""pytest-benchmark suite: eager reference vs refquant.compiled, on CPU and on CUDA where present.

    pytest benchmarks/ -p no:cacheprovider -o addopts="" --benchmark-group-by=param:name

Times are for reading, never for gating CI; benchmarks/gpu_report.py gives ratios to a copy.
"""

from __future__ import annotations

import pytest
import torch

import refquant as rq
import refquant.compiled as rc

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = {"cpu": (256, 4096), "cuda": (8192, 16384)}
CALLS = {
    "fp8_fake_quant_amax_given": lambda m, x, a: m.fp8_fake_quant(x, a),
    "nvfp4_fake_quant_amax_given": lambda m, x, a: m.nvfp4_fake_quant(x, a),
    "nvfp4_fake_quant_amax_computed": lambda m, x, a: m.nvfp4_fake_quant(x),
    "nvfp4_quantize_amax_given": lambda m, x, a: m.nvfp4_quantize(x, a),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("name", list(CALLS))
def test_numerics(benchmark, name, backend, device):
    x = (torch.randn(*SHAPES[device], device=device) * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    module = rq if backend == "eager" else rc
    call = CALLS[name]
    call(module, x, amax)  # compile outside the timed rounds

    def run():
        out = call(module, x, amax)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(run)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("path", ["quantizer, compiled", "quantizer, reference", "compiled function", "through dynamo"])
def test_host_time_of_a_small_quantizer_call(benchmark, fmt, path):
    """Host time of one fake-quant call on a small tensor, where the kernel is negligible and the
    host's work is the cost (the PTQ forward's case; benchmarks/probes/host_time.py cuts it into steps)."""
    from refquant.compiled import functions
    from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer

    x = torch.randn(16, 256, dtype=torch.bfloat16)
    amax = x.abs().amax().float()
    kwargs = {"flavor": "modelopt-cpu"} if fmt == "fp8" else {}
    compiled_function = rc.fp8_fake_quant if fmt == "fp8" else rc.nvfp4_fake_quant
    compiled_function(x, amax, **kwargs)
    if path.startswith("quantizer"):
        quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend=path.split(", ")[1])
        quantizer.set_amax(amax)
        call = lambda: quantizer(x)  # noqa: E731
    elif path == "compiled function":
        call = lambda: compiled_function(x, amax, **kwargs)  # noqa: E731
    else:
        per_signature = functions._compiled_fp8_fake_quant if fmt == "fp8" else functions._compiled_nvfp4_fake_quant
        graph_kwargs = {"axis": None, **kwargs} if fmt == "fp8" else {}
        entry = per_signature.for_call((functions._rows(x), amax), graph_kwargs)
        rows = functions._rows(x)
        functions._mark_positional((rows,))
        call = lambda: entry(rows, amax, **graph_kwargs)  # noqa: E731
    with torch.no_grad():
        call()
        benchmark(call)
