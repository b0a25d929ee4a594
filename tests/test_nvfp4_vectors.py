"""NVFP4 against modelopt's own outputs, bit for bit.

- Real quant (NVFP4QTensor, docs/modelopt_behaviour.md §4): nvfp4_real.pt, and the CPU stand-in
  files nvfp4_fake.pt and nvfp4_fake_sweep.pt (NVFP4QTensor quantize + dequantize): global scale
  == wsf2, block scale bits, packed bytes, codes (when stored) and dequantize() == y, exactly.
- Fake quant (the Triton kernel behind TensorQuantizer, §3.3): nvfp4_fake_cuda.pt, every element
  of every case, with the kernel's approximate division reproduced (docs/contract.md §3).
Every test runs on CPU and, where a GPU is present, on CUDA (docs/contract.md §1).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, find_case, vector_cases

import refquant as rq
from refquant.numerics.formats import E2M1_MAGNITUDES, RCP_2688
from refquant.numerics.nvfp4 import e2m1_magnitude_index, to_blocks
from refquant.testing import assert_bitexact, bits_of

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES)


def _cases(file_name: str) -> list:
    return [pytest.param(case, id=case["name"]) for case in vector_cases(file_name)]


def _assert_real_case(qtensor: rq.NVFP4Tensor, case: dict) -> None:
    name = case["name"]
    assert_bitexact(qtensor.global_scale, case["wsf2"], f"{name}.global_scale (wsf2)")
    assert_bitexact(qtensor.block_scale.view(torch.uint8), case["block_scale_bits"], f"{name}.block_scale")
    if "packed" in case:
        assert_bitexact(qtensor.packed, case["packed"], f"{name}.packed")
    if case.get("codes") is not None:
        assert_bitexact(qtensor.codes(), case["codes"], f"{name}.codes")
    assert_bitexact(qtensor.dequantize(), case["y"], f"{name}.y")


def _quantize(case: dict, device: str) -> rq.NVFP4Tensor:
    amax = case["global_amax"]
    return rq.nvfp4_quantize(case["x"].to(device), None if amax is None else amax.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("nvfp4_real.pt"))
def test_nvfp4_quantize_matches_nvfp4qtensor(case, device):
    _assert_real_case(_quantize(case, device), case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("nvfp4_fake_sweep.pt"))
def test_nvfp4_quantize_matches_nvfp4qtensor_on_every_finite_bf16_value(case, device):
    _assert_real_case(_quantize(case, device), case)


# Where refquant deviates from modelopt on purpose (docs/contract.md §5); the other observed_only
# cases are compared, and marked xfail (with the difference) should modelopt's bits ever differ.
OUR_DEVIATIONS = {"all_zero_tensor_amax_computed"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases("nvfp4_fake.pt"))
def test_nvfp4_quantize_matches_modelopt_cpu_stand_in(case, device):
    if case["name"] in OUR_DEVIATIONS:
        pytest.skip("refquant deviates here on purpose; see test_all_zero_tensor_gives_zeros_and_unit_scale")
    qtensor = _quantize(case, device)
    if not case["observed_only"]:
        _assert_real_case(qtensor, case)
        return
    try:
        _assert_real_case(qtensor, case)
    except AssertionError as difference:
        pytest.xfail(f"observed_only case (modelopt defines no behaviour) differs: {difference}")


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_tensor_gives_zeros_and_unit_scale(device):
    """Our deviation: modelopt's 0/0 block scale makes every output NaN; we give zeros, scale 1.0."""
    case = find_case("nvfp4_fake.pt", "all_zero_tensor_amax_computed")
    assert torch.isnan(case["y"]).all(), "the vector records modelopt's NaN output"
    qtensor = rq.nvfp4_quantize(case["x"].to(device))
    assert_bitexact(qtensor.global_scale, torch.tensor(0.0), "global_scale (amax 0)")
    assert_bitexact(qtensor.block_scale, torch.ones_like(qtensor.block_scale), "block_scale")
    assert_bitexact(qtensor.packed, torch.zeros_like(qtensor.packed), "packed")
    assert_bitexact(qtensor.dequantize(), torch.zeros_like(case["x"], device=device), "y")


# --- fake quant against the Triton kernel's outputs (nvfp4_fake_cuda.pt) ----------------------


def _source_case(case: dict) -> dict:
    return find_case(case["source_file"], case["name"])


def _fake_amax(case: dict):
    if case["source_file"] == "kv_cast.pt":
        return 448.0  # use_constant_amax
    return case["global_amax"]


def _fake_cuda_cases() -> list:
    return [
        pytest.param(case, id=case["name"])  # names are unique across the file's sources
        for case in vector_cases("nvfp4_fake_cuda.pt")
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _fake_cuda_cases())
def test_nvfp4_fake_quant_matches_triton_kernel_bit_for_bit(case, device):
    """Every element of every case, observed_only ones included: 0 differ (docs/contract.md §3;
    the allowance of 3 near-tie elements that the IEEE reciprocal needed is gone)."""
    amax = _fake_amax(case)
    x = _source_case(case)["x"]
    actual = rq.nvfp4_fake_quant(x.to(device), None if amax is None else torch.as_tensor(amax).to(device))
    assert_bitexact(actual.cpu(), case["y_cuda_tensorquantizer"], case["name"])


def test_the_ieee_division_would_miss_the_kernel():
    """The cases above can tell the kernel's division from IEEE's: with |x| / S and m / d taken as
    IEEE quotients, 70 elements of the file differ (docs/contract.md §3)."""
    differing = 0
    for case in vector_cases("nvfp4_fake_cuda.pt"):
        x = _source_case(case)["x"]
        amax = _fake_amax(case)
        global_amax = x.abs().amax().float() if amax is None else torch.as_tensor(amax, dtype=torch.float32)
        blocks = to_blocks(x.float())
        magnitude = blocks.abs()
        g = global_amax * RCP_2688
        g = torch.where(g > 0, g, torch.full_like(g, 1e-12))
        block_max = torch.where(torch.isnan(magnitude), 0.0, magnitude).amax(dim=-1, keepdim=True)
        e4m3 = (block_max / (g * 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn).float()
        scale = e4m3 * g
        scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
        p = E2M1_VALUES[e2m1_magnitude_index(magnitude / scale).long()] * scale
        ieee = torch.where(blocks >= 0, p, 0.0 - p).to(x.dtype).flatten(-2)[..., : x.shape[-1]]
        expected = case["y_cuda_tensorquantizer"]
        differing += int(((bits_of(ieee) != bits_of(expected)) & ~(torch.isnan(ieee) & torch.isnan(expected))).sum())
    assert differing == 70, f"{differing} elements differ under IEEE division, 70 expected"


def test_nvfp4_fake_cuda_cases_all_name_a_cpu_case():
    for case in vector_cases("nvfp4_fake_cuda.pt"):
        source = _source_case(case)
        assert source["x"].shape == case["y_cuda_tensorquantizer"].shape
        if case["source_file"] != "kv_cast.pt":
            assert (case["global_amax"] is None) == (source["global_amax"] is None)
