"""FP8 E4M3 against modelopt's own outputs: every case of every FP8 vector file, bit for bit.

Fake quant (TensorQuantizer, docs/modelopt_behaviour.md §1): fp8_fake_exhaustive / random /
per_channel are modelopt's CPU run (flavor "modelopt-cpu"); fp8_fake_cuda holds the cases whose
CUDA output differs (flavor "modelopt-cuda"). Real quant (FP8QTensor, §2): fp8_real. NaN compares
as NaN.
Every test runs on CPU and, where a GPU is present, on CUDA: refquant promises the same bits on
both (docs/contract.md §1).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, find_case, vector_cases

import refquant as rq
from refquant.testing import assert_bitexact

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
FAKE_FILES = ("fp8_fake_exhaustive.pt", "fp8_fake_random.pt", "fp8_fake_per_channel.pt")


def _cases(file_name: str) -> list:
    return [pytest.param(case, id=case["name"]) for case in vector_cases(file_name)]


def _fake_quant_like_modelopt(case: dict, device: str, flavor: str) -> torch.Tensor:
    """Run fp8_fake_quant the way the vector's TensorQuantizer ran: dynamic amax -> amax=None."""
    x = case["x"].to(device)
    if case.get("amax_mode") == "dynamic":
        return rq.fp8_fake_quant(x, None, axis=case.get("axis"), flavor=flavor)
    return rq.fp8_fake_quant(x, case["amax"].to(device), flavor=flavor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("fp8_fake_exhaustive.pt"))
def test_fp8_fake_quant_matches_modelopt_cpu_on_all_16bit_patterns(case, device):
    assert_bitexact(_fake_quant_like_modelopt(case, device, "modelopt-cpu"), case["y"], case["name"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("fp8_fake_random.pt"))
def test_fp8_fake_quant_matches_modelopt_cpu_on_random_tensors(case, device):
    assert_bitexact(_fake_quant_like_modelopt(case, device, "modelopt-cpu"), case["y"], case["name"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("fp8_fake_per_channel.pt"))
def test_fp8_fake_quant_matches_modelopt_cpu_per_channel(case, device):
    assert_bitexact(_fake_quant_like_modelopt(case, device, "modelopt-cpu"), case["y"], case["name"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("fp8_fake_cuda.pt"))
def test_fp8_fake_quant_cuda_flavor_matches_modelopt_cuda_extension(case, device):
    source = find_case(case["source_file"], case["name"])
    actual = _fake_quant_like_modelopt(source, device, "modelopt-cuda")
    assert_bitexact(actual, case["y_cuda"], f"{case['source_file']}:{case['name']}")


def test_fp8_fake_cuda_file_only_lists_cases_of_the_cpu_files():
    """Every CUDA case names a CPU case (the rest were bit-identical on CUDA, README)."""
    for case in vector_cases("fp8_fake_cuda.pt"):
        assert case["source_file"] in FAKE_FILES
        find_case(case["source_file"], case["name"])  # raises KeyError when missing


def _real_quantize_like_modelopt(case: dict, device: str) -> rq.FP8Tensor:
    x = case["x"].to(device)
    if case["scales_given"] is not None:
        return rq.fp8_quantize(x, scale=case["scales_given"].to(device))
    if case["block_sizes"] is not None:
        assert dict(case["block_sizes"]) == {"-1": 32}, "only last-dim blocks of 32 are in the set"
        return rq.fp8_quantize(x, block_size=32)
    return rq.fp8_quantize(x, axis=case["axis"])


def _assert_fp8_real_case(qtensor: rq.FP8Tensor, case: dict) -> None:
    name = case["name"]
    assert_bitexact(qtensor.data.view(torch.uint8), case["q_bits"], f"{name}.q_bits")
    assert_bitexact(qtensor.scale, case["scale"], f"{name}.scale")
    assert_bitexact(qtensor.dequantize(), case["y"], f"{name}.y")
    assert_bitexact(qtensor.dequantize(torch.float32), case["y_f32"], f"{name}.y_f32")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("fp8_real.pt"))
def test_fp8_quantize_and_dequantize_match_fp8qtensor(case, device):
    _assert_fp8_real_case(_real_quantize_like_modelopt(case, device), case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case", [p for p in _cases("fp8_real.pt") if p.values[0]["name"].endswith("_tensorquantizer_real")]
)
def test_fp8_quantize_from_amax_matches_tensorquantizer_real_path(case, device):
    """TensorQuantizer(fake_quant=False) with amax = max|x|: scale = amax / 448 in fp32."""
    x = case["x"].to(device)
    qtensor = rq.fp8_quantize(x, amax=x.abs().amax().float())
    assert_bitexact(qtensor.scale, case["scales_given"], f"{case['name']}.scale (amax/448)")
    _assert_fp8_real_case(qtensor, case)
