"""FP8 real quant where modelopt gives garbage and refquant a defined result (docs/contract.md §5).

modelopt's FP8QTensor divides by amax / 448 with no zero guard: an all-zero tensor, channel or
block gets scale 0 and 0 / 0 = NaN bytes. refquant writes zero bytes there (scale stays 0, as
modelopt returns it), so dequantize gives zeros. Everything else is modelopt's, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import refquant as rq
from refquant.testing import assert_bitexact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_zero_tensor_quantizes_to_zero_bytes_and_dequantizes_to_zeros(dtype):
    x = torch.zeros(3, 32, dtype=dtype)
    q = rq.fp8_quantize(x)
    assert float(q.scale) == 0.0 and q.scale.dtype == dtype  # modelopt's scale, amax / 448 = 0
    assert_bitexact(q.data.view(torch.uint8), torch.zeros(3, 32, dtype=torch.uint8))
    assert_bitexact(q.dequantize(), x)


def test_zero_channel_and_zero_block_give_zero_bytes_while_the_rest_is_untouched():
    x = torch.linspace(-2, 2, 4 * 64).reshape(4, 64)
    x[1] = 0.0  # one all-zero row: a zero per-channel scale and two zero blocks of 32
    for kwargs in ({"axis": 0}, {"block_size": 32}):
        q = rq.fp8_quantize(x, **kwargs)
        assert not torch.isnan(q.data.float()).any(), kwargs
        assert (q.data[1].view(torch.uint8) == 0).all(), kwargs
        # the other rows are exactly what they are without the zero row
        reference = rq.fp8_quantize(torch.cat([x[:1], x[2:]]), **kwargs)
        assert_bitexact(torch.cat([q.data[:1], q.data[2:]]).view(torch.uint8), reference.data.view(torch.uint8))


def test_nonzero_values_under_a_zero_amax_saturate_and_dequantize_to_zero():
    """amax = 0 from a caller (TensorQuantizer path): scale 0; x / 0 saturates to +-448, times 0 = 0."""
    x = torch.tensor([0.0, 1.5, -2.0])
    q = rq.fp8_quantize(x, amax=0.0)
    assert q.data.float().tolist() == [0.0, 448.0, -448.0]
    assert q.dequantize().abs().tolist() == [0.0, 0.0, 0.0]
