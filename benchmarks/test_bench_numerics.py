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
