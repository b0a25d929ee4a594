"""FP8 real quant where modelopt gives garbage and refquant a defined result (docs/contract.md §5).

modelopt's FP8QTensor divides by amax / 448 with no zero guard: an all-zero tensor, channel or
block gets scale 0 and 0 / 0 = NaN bytes. refquant writes zero bytes there (scale stays 0, as
modelopt returns it), so dequantize gives zeros. A given amax of 0, for which modelopt's x / 0
saturates, takes the scale of the maxbound 448 (1.0), as modelopt's export gives such an amax.
Everything else is modelopt's, bit for bit.
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_a_zero_amax_gives_the_scale_of_the_maxbound_as_modelopts_export_does(dtype):
    """A given amax of 0 (a quantizer that calibration never reached) would make the scale
    amax / 448 = 0, and modelopt's x / 0 saturated bytes under it. modelopt's export maps a zero
    amax to the maxbound, 448, so a checkpoint's scale stays positive (refquant.hf.export's
    _export_amax does the same): fp8_quantize gives the bytes and the scale 1.0 of amax 448."""
    from refquant.hf.export.tensors import _export_amax, fp8_scale

    x = torch.tensor([0.0, 1.5, -2.0, 500.0, -0.001]).to(dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    q = rq.fp8_quantize(x, amax=zero)
    maxbound = rq.fp8_quantize(x, amax=torch.tensor(448.0, dtype=dtype))
    assert_bitexact(q.data.view(torch.uint8), maxbound.data.view(torch.uint8), "bytes")
    assert_bitexact(q.scale, maxbound.scale, "scale")
    assert float(q.scale) == 1.0 == float(fp8_scale(_export_amax(zero, 448.0, clamp=True), "modelopt-cpu"))
    assert_bitexact(rq.fp8_quantize(x, 0.0).data.view(torch.uint8), maxbound.data.view(torch.uint8), "amax given as a number")


def test_a_zero_channel_of_a_given_amax_gets_scale_one_and_the_others_keep_theirs():
    x = torch.linspace(-2, 2, 4 * 32).reshape(4, 32)
    x[1] = 0.0
    amax = x.abs().amax(dim=1, keepdim=True)  # channel 1: 0
    q = rq.fp8_quantize(x, amax=amax)
    assert q.scale[1].item() == 1.0
    assert (q.data[1].view(torch.uint8) == 0).all()
    others = rq.fp8_quantize(x[[0, 2, 3]], amax=amax[[0, 2, 3]])
    assert_bitexact(q.data[[0, 2, 3]].view(torch.uint8), others.data.view(torch.uint8), "the other channels' bytes")
    assert_bitexact(q.scale[[0, 2, 3]], others.scale, "the other channels' scales")


def test_an_amax_whose_scale_is_zero_in_its_dtype_gives_scale_one():
    """fp16 holds nothing below 2**-24, so an fp16 amax under about 448 * 2**-25 has amax / 448 = 0
    in fp16: the same zero scale as amax 0, and the same answer."""
    amax = torch.tensor(1e-5, dtype=torch.float16)
    assert float(amax) > 0 and float(rq.fp8_quantize(torch.ones(4, dtype=torch.float16), amax=amax).scale) == 1.0


def test_no_given_amax_or_scale_makes_a_zero_scale():
    """amax 0 and scale 0 agree: the scale of a given amax is never 0, and a given scale of 0 is
    refused (modelopt's export asserts its scales are positive)."""
    x = torch.tensor([1.5, -2.0])
    assert float(rq.fp8_quantize(x, amax=0.0).scale) > 0
    with pytest.raises(ValueError, match="scale"):
        rq.fp8_quantize(x, scale=0.0)
