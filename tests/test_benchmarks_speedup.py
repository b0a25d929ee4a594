"""Speedups of refquant.compiled, as ratios measured in one run (CI's default run leaves these out).

Compiled over eager (CPU, and CUDA where present), and over modelopt's own CUDA kernels where they
import. No absolute time is asserted. benchmarks/gpu_report.py prints the full table.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import cuda

import refquant as rq
import refquant.compiled as rc

pytestmark = pytest.mark.benchmark


def _median_ms(fn, repeats: int = 15) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


CALLS = {
    "fp8_fake_quant": lambda m, x, a: m.fp8_fake_quant(x, a),
    "nvfp4_fake_quant": lambda m, x, a: m.nvfp4_fake_quant(x, a),
    "nvfp4_quantize": lambda m, x, a: m.nvfp4_quantize(x, a),
}


def _cases():
    for name in CALLS:
        yield pytest.param(name, "cpu", (512, 2048))
        yield pytest.param(name, "cuda", (8192, 16384), marks=cuda)


@pytest.mark.parametrize("name,device,shape", list(_cases()))
def test_compiled_is_faster_than_eager(name, device, shape):
    x = (torch.randn(*shape, device=device) * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    call = CALLS[name]
    eager_ms = _median_ms(lambda: call(rq, x, amax))
    compiled_ms = _median_ms(lambda: call(rc, x, amax))
    # Measured on an H100: 10x (FP8), 13x and 19x (NVFP4); on 2 CPU cores less.
    assert eager_ms / compiled_ms > (3.0 if device == "cuda" else 1.2), f"{name}: eager {eager_ms:.3f} ms, compiled {compiled_ms:.3f} ms"


@cuda
def test_compiled_fp8_fake_quant_is_faster_than_modelopt_cuda_extension():
    tensor_quant = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
    x = (torch.randn(8192, 16384, device="cuda") * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    modelopt_ms = _median_ms(lambda: tensor_quant.scaled_e4m3_impl(x, amax))
    compiled_ms = _median_ms(lambda: rc.fp8_fake_quant(x, amax))
    assert modelopt_ms / compiled_ms > 1.2, f"modelopt {modelopt_ms:.3f} ms, compiled {compiled_ms:.3f} ms"


@cuda
def test_compiled_nvfp4_quantize_is_faster_than_nvfp4qtensor():
    nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    x = (torch.randn(8192, 16384, device="cuda") * 3).to(torch.bfloat16)
    amax = x.abs().amax().float()
    modelopt_ms = _median_ms(lambda: nvfp4_tensor.NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=amax / 2688.0))
    compiled_ms = _median_ms(lambda: rc.nvfp4_quantize(x, amax))
    assert modelopt_ms / compiled_ms > 5.0, f"modelopt {modelopt_ms:.3f} ms, compiled {compiled_ms:.3f} ms"
