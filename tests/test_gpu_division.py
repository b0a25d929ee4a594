"""The GPU's approximate division (refquant.numerics.gpu_division) against the GPU itself.

- The shipped reciprocal table equals an independent measurement of the same instruction.
- approx_divide gives the bits of div.full.f32 (and of Triton's fp32 `/`) as an H200 computed
  them, on every pair of 45 special operands and in every region the table alone does not cover
  (gpu_division_probe.pt); on CPU and CUDA.
- approx_reciprocal_fp32 is the fast form the fake-quant element step uses: exactly approx_divide
  for every in-range divisor mantissa.
"""

from __future__ import annotations

import hashlib
import zlib

import pytest
import torch
from conftest import VECTORS, cuda, vector_cases
from hypothesis import given
from hypothesis import strategies as st

from refquant.numerics.gpu_division import (
    TABLE_PATH,
    approx_divide,
    approx_reciprocal,
    approx_reciprocal_fp32,
    decode_deltas,
    reciprocal_table,
)
import refquant as rq
from refquant.testing import assert_bitexact

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
CROSS_CHECK = VECTORS / "rcp_approx_sm90_delta_crosscheck.bin.zlib"


def _fp32(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)


def test_shipped_table_equals_the_independent_measurement():
    shipped, other = TABLE_PATH.read_bytes(), CROSS_CHECK.read_bytes()
    assert torch.equal(decode_deltas(shipped), decode_deltas(other))
    assert hashlib.sha256(other).hexdigest() == "28fcf17c18714632794518ddfb207d2c7b3ef28f2c79cab64f7e8f8520f723bc"


def test_table_holds_the_measured_delta_counts():
    delta = decode_deltas(TABLE_PATH.read_bytes())
    assert [int((delta == d).sum()) for d in (-1, 0, 1)] == [374_723, 7_280_086, 733_799]
    assert int(delta[0]) == 0  # rcp.approx(1.0) is exactly 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in vector_cases("gpu_division_probe.pt")])
def test_approx_divide_gives_the_gpu_bits(case, device):
    quotient = approx_divide(case["a"].to(device), case["b"].to(device)).cpu()
    assert_bitexact(quotient, case["div_full"], f"{case['name']}: div.full.f32")
    assert_bitexact(quotient, case["triton_div"], f"{case['name']}: Triton's fp32 /")


def test_probe_regions_are_outside_the_fast_form():
    """The probe covers what a table lookup alone would get wrong (else it would prove nothing)."""
    cases = {c["name"]: c for c in vector_cases("gpu_division_probe.pt")}
    for name in ("huge_b", "subnormal_b"):
        case = cases[name]
        wrong = case["a"] * approx_reciprocal_fp32(case["b"])
        assert not torch.equal(wrong.view(torch.int32), case["div_full"].view(torch.int32)), name


def test_worked_example_differs_from_ieee():
    """4.6875 / 0.9375 is exactly 5; the GPU's division gives the next fp32 up (docs/numerics.md)."""
    a, b = torch.tensor([4.6875]), torch.tensor([0.9375])
    assert (a / b).item() == 5.0
    assert_bitexact(approx_divide(a, b), _fp32(0x40A00001), "4.6875 / 0.9375")


@pytest.mark.parametrize("device", DEVICES)
def test_worked_examples_of_docs_numerics(device):
    """docs/numerics.md, "One quotient, IEEE against the kernel": both examples, as stated there."""
    block = torch.tensor([5.625, 4.6875] + [0.0] * 14, device=device)
    assert rq.nvfp4_fake_quant(block, 10.5)[:2].tolist() == [5.625, 5.625]  # IEEE would give 3.75
    scale = torch.tensor([0.9375], device=device)
    assert_bitexact(approx_reciprocal_fp32(scale).cpu(), _fp32(0x3F888889), "R(0.9375)")
    weight_scale = _fp32(0x3BDC924A).to(device)
    reciprocal = approx_reciprocal_fp32(weight_scale).cpu()
    assert_bitexact(reciprocal, _fp32(int((1.0 / _fp32(0x3BDC924A)).view(torch.int32)) + 1), "R(S) = RN(1/S) + 1 ulp")
    x = torch.tensor([0x3CC1], dtype=torch.int16).view(torch.bfloat16).float().to(device)
    assert approx_divide(x, weight_scale).item() == 3.5
    assert (x / weight_scale).item() < 3.5 and (x * (1.0 / weight_scale)).item() < 3.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exponent", [-126, -60, -1, 0, 1, 37, 125])
def test_fast_form_is_approx_divide_for_every_mantissa(exponent, device):
    mantissa = torch.arange(1 << 23, dtype=torch.int32, device=device)
    b = (mantissa | ((exponent + 127) << 23)).view(torch.float32)
    generator = torch.Generator(device=device).manual_seed(exponent + 200)
    a = torch.randn(b.shape, generator=generator, device=device) * 3.0
    assert_bitexact(a * approx_reciprocal_fp32(b), approx_divide(a, b), f"2^{exponent} * 1.m")


@pytest.mark.parametrize("device", DEVICES)
def test_reciprocal_table_is_the_same_on_every_device(device):
    assert torch.equal(reciprocal_table(device).cpu(), reciprocal_table("cpu"))


@given(
    st.floats(min_value=-(2.0**100), max_value=2.0**100, width=32),
    st.floats(min_value=2.0**-100, max_value=2.0**100, width=32),
)
def test_approx_divide_is_within_two_ulp_and_odd(a, b):
    """PTX bounds div.full.f32 at 2 ulp; the sign follows the operands'."""
    ta, tb = torch.tensor([a]), torch.tensor([b])
    quotient = approx_divide(ta, tb)
    exact = (ta.double() / tb.double()).float()
    ulps = (quotient.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    assert int(ulps) <= 2, (a, b, quotient.item(), exact.item())
    assert_bitexact(approx_divide(-ta, tb), -quotient, "sign")
    assert_bitexact(approx_divide(ta, -tb), approx_divide(-ta, tb), "sign of the divisor")


def test_reciprocal_of_special_divisors():
    b = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 2.0**-149])
    r = approx_reciprocal(b)
    assert r.dtype == torch.float64
    assert r[:4].tolist() == [float("inf"), -float("inf"), 0.0, -0.0]
    assert torch.signbit(r[3]) and torch.isnan(r[4])
    assert r[5].item() == 2.0**149  # 1/subnormal: exact, and beyond fp32's range


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"not zlib", "not a zlib stream"),
        (zlib.compress(b"\x55" * 100), "2\\^23"),
        (zlib.compress(b"\xff" * (1 << 21)), "outside"),
    ],
)
def test_damaged_tables_are_rejected(blob, message):
    with pytest.raises(ValueError, match=message):
        decode_deltas(blob)
