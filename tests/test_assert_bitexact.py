"""refquant.testing.assert_bitexact: bits compared, NaN == NaN, and messages a kernel engineer can use.

On a mismatch the message gives the count, the first mismatching indices, both values with their
bits decoded (sign/exponent/mantissa for floats and E4M3; code and value for E2M1 nibbles, with the
block and its scale), and it takes FP8Tensor and NVFP4Tensor pairs part by part.
"""

from __future__ import annotations

import re

import pytest
import torch

import refquant as rq
from refquant.testing import assert_bitexact, decode_e2m1, decode_float_bits


def _message(actual, expected, what: str = "tensor") -> str:
    with pytest.raises(AssertionError) as raised:
        assert_bitexact(actual, expected, what)
    return str(raised.value)


def _bf16(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


# --- what counts as equal ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_identical_bits_pass(dtype):
    x = torch.tensor([0.0, -0.0, 1.5, -448.0, 2.0**-9]).to(dtype)
    assert_bitexact(x, x.clone())


def test_nan_equals_nan_whatever_its_payload_and_sign():
    canonical, cpu_style = _bf16([0x7FC0, 0x7FFF]), _bf16([0xFFFF, 0xFFC1])  # CUDA vs CPU NaNs (P9)
    assert_bitexact(canonical, cpu_style)
    fp32_nan = torch.tensor([0x7FC00000, 0x7FFFFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert_bitexact(fp32_nan, fp32_nan.flip(0))


def test_nan_against_a_number_fails():
    assert "1 of 2 elements differ" in _message(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))


def test_signed_zeros_differ():
    message = _message(torch.tensor([-0.0]), torch.tensor([0.0]))
    assert "0x80000000 (s=1 e=0 m=0) = -0.0" in message
    assert "0x00000000 (s=0 e=0 m=0) = 0.0" in message


def test_one_ulp_differs():
    one = torch.tensor([1.0])
    assert "1 of 1 elements differ" in _message(torch.nextafter(one, torch.tensor([2.0])), one)


# --- mismatch messages ---------------------------------------------------------------------------


def test_message_gives_count_first_indices_values_and_decoded_bits():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[0, 2], actual[2, 1] = 1.0, -2.5
    message = _message(actual, expected, "weights")
    assert message.splitlines()[0] == "weights: 2 of 12 elements differ in their bits (NaN == NaN)."
    assert "at [0, 2]:" in message and "at [2, 1]:" in message
    assert message.index("at [0, 2]") < message.index("at [2, 1]"), "mismatches in index order"
    assert "actual   0x3F800000 (s=0 e=127 m=0) = 1.0" in message
    assert "actual   0xC0200000 (s=1 e=128 m=2097152) = -2.5" in message
    assert message.count("expected 0x00000000 (s=0 e=0 m=0) = 0.0") == 2


@pytest.mark.parametrize(
    "dtype, value, decoded",
    [
        (torch.float32, 1.0, "0x3F800000 (s=0 e=127 m=0) = 1.0"),
        (torch.bfloat16, -3.0, "0xC040 (s=1 e=128 m=64) = -3.0"),
        (torch.float16, 65504.0, "0x7BFF (s=0 e=30 m=1023) = 65504.0"),
        (torch.float8_e4m3fn, 448.0, "0x7E (s=0 e=15 m=6) = 448.0"),  # E4M3: 4-bit exponent, bias 7
        (torch.float8_e4m3fn, 2.0**-9, "0x01 (s=0 e=0 m=1) = 0.001953125"),  # smallest subnormal
    ],
)
def test_bits_are_decoded_per_format(dtype, value, decoded):
    actual = torch.tensor([value]).to(dtype)
    message = _message(actual, torch.zeros(1).to(dtype))
    assert f"actual   {decoded}" in message


def test_e4m3_nan_is_decoded():
    nan = torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert "0x7F (s=0 e=15 m=7) = nan" in _message(nan, torch.zeros(1).to(torch.float8_e4m3fn))


def test_long_mismatch_lists_the_first_eight_and_counts_the_rest():
    message = _message(torch.ones(20), torch.zeros(20))
    assert "20 of 20 elements differ" in message
    listed = re.findall(r"at \[(\d+)\]:", message)
    assert listed == [str(i) for i in range(8)]
    assert "... and 12 more." in message


def test_integer_tensors_compare_and_report_their_values():
    message = _message(torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1, 5, 3], dtype=torch.uint8))
    assert "1 of 3 elements differ" in message and "actual   2" in message and "expected 5" in message


def test_dtype_and_shape_must_match():
    assert "dtype differs" in _message(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16))
    assert "shape differs: actual (2,), expected (1, 2)" in _message(torch.zeros(2), torch.zeros(1, 2))


def test_non_tensors_are_a_type_error():
    with pytest.raises(TypeError, match="compares tensors"):
        assert_bitexact([1.0], torch.tensor([1.0]))


def test_decode_helpers():
    assert decode_e2m1(0b0111) == "code  7 (0b0111) = 6.0"
    assert decode_e2m1(0b1001) == "code  9 (0b1001) = -0.5"
    assert decode_e2m1(0b1000) == "code  8 (0b1000) = 0.0"  # "negative zero" dequantizes to +0.0
    assert decode_float_bits(1.0, 0x3F80, torch.bfloat16) == "0x3F80 (s=0 e=127 m=0) = 1.0"


# --- FP8Tensor and NVFP4Tensor pairs -------------------------------------------------------------


X = torch.linspace(-2.0, 2.0, 64).reshape(2, 32)


def test_nvfp4_tensor_pairs_compare_part_by_part():
    assert_bitexact(rq.nvfp4_quantize(X), rq.nvfp4_quantize(X.clone()))


def test_nvfp4_global_scale_mismatch_is_named():
    # 3.3 / 2688 (IEEE, the CPU flavor) and 3.3 * rcp(2688) (the CUDA flavor) are one ulp apart.
    cpu, gpu = rq.nvfp4_quantize(X, 3.3), rq.nvfp4_quantize(X, 3.3, flavor="modelopt-cuda")
    message = _message(cpu, gpu, "w")
    assert message.startswith("w.global_scale: 1 of 1 elements differ")


def test_nvfp4_block_scale_mismatch_is_decoded_as_e4m3():
    actual, expected = rq.nvfp4_quantize(X), rq.nvfp4_quantize(X)
    expected.block_scale = expected.block_scale.clone()
    expected.block_scale[1, 0] = torch.tensor(416.0).to(torch.float8_e4m3fn)
    message = _message(actual, expected, "w")
    assert message.startswith("w.block_scale: 1 of 4 elements differ")
    assert "at [1, 0]:" in message and "expected 0x7D (s=0 e=15 m=5) = 416.0" in message


def test_nvfp4_packed_mismatch_decodes_both_nibbles_and_names_the_block_and_its_scale():
    actual, expected = rq.nvfp4_quantize(X), rq.nvfp4_quantize(X)
    expected.packed = expected.packed.clone()
    expected.packed[1, 11] ^= 0x10  # flip bit 0 of element 23's code (the high nibble)
    message = _message(actual, expected, "w")
    assert message.startswith("w.packed: 1 of 32 elements differ")
    byte = int(actual.packed[1, 11])
    low, high = byte & 0xF, byte >> 4
    assert f"actual   byte 0x{byte:02X}: low code {low:2d}" in message
    assert f"high code {high ^ 1:2d} (0b{high ^ 1:04b})" in message
    assert "elements 22,23 lie in block [1, 1]: block scale actual 0x" in message


def test_nvfp4_shape_mismatch_is_reported_before_the_parts():
    message = _message(rq.nvfp4_quantize(X), rq.nvfp4_quantize(X[:, :16]))
    assert "NVFP4Tensor metadata differs" in message and "(2, 32)" in message and "(2, 16)" in message


def test_fp8_tensor_pairs_compare_scale_and_data():
    assert_bitexact(rq.fp8_quantize(X), rq.fp8_quantize(X.clone()))
    message = _message(rq.fp8_quantize(X, scale=0.01), rq.fp8_quantize(X, scale=0.02), "a")
    assert message.startswith("a.scale: 1 of 1 elements differ")
    actual, expected = rq.fp8_quantize(X), rq.fp8_quantize(X)
    expected.data = expected.data.clone()
    expected.data[0, 0] = torch.tensor(0.0).to(torch.float8_e4m3fn)
    message = _message(actual, expected, "a")
    assert message.startswith("a.data: 1 of 64 elements differ") and "expected 0x00 (s=0 e=0 m=0) = 0.0" in message
