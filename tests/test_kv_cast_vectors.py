"""KV-cache "cast" quantizers (use_constant_amax=True, docs/modelopt_behaviour.md §5) against
kv_cast.pt.

modelopt pins amax to 448.0 (the E4M3 max) and keeps no amax buffer. FP8: scale exactly 1, so
fp8_fake_quant(x, 448.0) is x clamped to +-448 and rounded to E4M3. NVFP4: the vectors hold the CPU
stand-in NVFP4QTensor with G = 448 (wsf2 = fp32(1/6)); the CUDA kernel's outputs for the same
inputs are checked in test_nvfp4_vectors.py (nvfp4_fake_cuda.pt, source kv_cast.pt).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, vector_cases

import refquant as rq
from refquant.numerics.formats import E4M3_MAX
from refquant.testing import assert_bitexact

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _cases(fmt: str) -> list:
    return [pytest.param(c, id=c["name"]) for c in vector_cases("kv_cast.pt") if c["format"] == fmt]


def test_kv_cast_cases_use_the_constant_amax_448_and_no_buffer():
    cases = vector_cases("kv_cast.pt")
    assert {c["format"] for c in cases} == {"fp8", "nvfp4"}
    for case in cases:
        assert_bitexact(case["amax_used"], torch.tensor(E4M3_MAX), f"{case['name']}.amax_used")
        assert case["has_amax_buffer"] is False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
@pytest.mark.parametrize("case", _cases("fp8"))
def test_fp8_kv_cast_is_fake_quant_with_amax_448(case, flavor, device):
    """Both flavors agree here: 448 * rcp(448) and 448 / 448 are both exactly 1
    (docs/modelopt_behaviour.md §1.4)."""
    actual = rq.fp8_fake_quant(case["x"].to(device), E4M3_MAX, flavor=flavor)
    assert_bitexact(actual, case["y"], case["name"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("nvfp4"))
def test_nvfp4_kv_cast_is_nvfp4_quantize_with_amax_448(case, device):
    qtensor = rq.nvfp4_quantize(case["x"].to(device), E4M3_MAX)
    name = case["name"]
    assert_bitexact(qtensor.global_scale, case["wsf2"], f"{name}.global_scale (wsf2)")
    assert_bitexact(qtensor.block_scale.view(torch.uint8), case["block_scale_bits"], f"{name}.block_scale")
    assert_bitexact(qtensor.dequantize(), case["y"], f"{name}.y")
