"""The fake-quant kernels of refquant.compiled with one amax per slice (a stack of expert weights,
each under its own quantizer's amax), on CUDA.

What must hold: rc.fp8_fake_quant(x, amax) with amax of shape (E, 1, ..., 1) and
rc.nvfp4_fake_quant(x, amax, per_slice_amax=True) give each slice the reference's bits for that
slice under its own amax (refquant on the CPU), for every bf16 and fp16 pattern and every amax
regime; one launch for the whole stack when a slice is a whole number of the kernel's programs, a
launch a slice otherwise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, every_16_bit_pattern

import refquant as rq
import refquant.compiled as rc
from refquant.compiled.triton_launch import FakeQuantKernel
from refquant.testing import assert_bitexact

pytestmark = cuda

# FP8: ordinary, the 2**-24 floor and under it, 448, huge, zero. NVFP4: zero, tiny, ordinary, the
# amax whose global scale is 1, huge.
FP8_AMAXES = (3.0, 2.0**-24, 1e-30, 448.0, 0.37, 3.0e38, 0.0)
NVFP4_AMAXES = (0.0, 1e-30, 3.0, 2688.0, 3.0e38, 0.37)


def _cycled(values: tuple, count: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([values[i % len(values)] for i in range(count)], dtype=torch.float32).to(dtype)


def _launches(monkeypatch) -> list:
    calls: list = []
    original = FakeQuantKernel.__call__

    def counted(self, x, params, out=None):
        calls.append(tuple(x.shape))
        return original(self, x, params, out)

    monkeypatch.setattr(FakeQuantKernel, "__call__", counted)
    return calls


def _each_slice(out: torch.Tensor, x: torch.Tensor, amax: torch.Tensor, alone, what: str) -> None:
    for index in range(x.shape[0]):
        assert_bitexact(out[index].cpu(), alone(x[index], amax[index]), f"{what}, slice {index} (amax {float(amax[index])})")


@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("slices", [16, 4, 2], ids=["a program a slice", "4 programs a slice", "8 programs a slice"])
@pytest.mark.parametrize("amax_dtype", [torch.float32, torch.bfloat16])
def test_fp8_one_launch_gives_each_slice_the_reference_bits(monkeypatch, flavor, dtype, slices, amax_dtype):
    x = every_16_bit_pattern(dtype).reshape(slices, -1, 64)
    amax = _cycled(FP8_AMAXES, slices, amax_dtype)
    calls = _launches(monkeypatch)
    out = rc.fp8_fake_quant(x.cuda(), amax.reshape(-1, 1, 1).cuda(), flavor=flavor)
    assert calls == [tuple(x.shape)], "one launch over the whole stack"
    _each_slice(out, x, amax, lambda s, a: rq.fp8_fake_quant(s, a, flavor=flavor), f"{dtype}, {flavor}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("slices", [32, 8, 2], ids=["a program a slice", "4 programs a slice", "16 programs a slice"])
@pytest.mark.parametrize("amax_dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_one_launch_gives_each_slice_the_reference_bits(monkeypatch, dtype, slices, amax_dtype):
    patterns = every_16_bit_pattern(dtype)
    # every pattern (NaN and inf included), shuffled so that blocks mix magnitudes
    x = patterns[torch.randperm(patterns.numel(), generator=torch.Generator().manual_seed(3))].reshape(slices, -1, 64)
    amax = _cycled(NVFP4_AMAXES, slices, amax_dtype)
    calls = _launches(monkeypatch)
    out = rc.nvfp4_fake_quant(x.cuda(), amax.reshape(-1, 1, 1).cuda(), per_slice_amax=True)
    assert calls == [tuple(x.shape)], "one launch over the whole stack"
    _each_slice(out, x, amax, lambda s, a: rq.nvfp4_fake_quant(s, a), str(dtype))
    assert_bitexact(out.cpu(), rq.nvfp4_fake_quant(x, amax.reshape(-1, 1, 1), per_slice_amax=True), "the per-slice reference")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_slices_that_are_not_whole_programs_take_a_launch_each(monkeypatch, fmt):
    """(5, 32, 48): 1,536 elements a slice, not a whole number of FP8's 4,096-element or NVFP4's
    128-block programs."""
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 32, 48, generator=generator) * 4).bfloat16()
    amax = torch.tensor([1.0, 0.0, 5.0, 1e-30, 448.0])
    calls = _launches(monkeypatch)
    if fmt == "fp8":
        out = rc.fp8_fake_quant(x.cuda(), amax.reshape(-1, 1, 1).cuda(), flavor="modelopt-cuda")
        alone = lambda s, a: rq.fp8_fake_quant(s, a, flavor="modelopt-cuda")  # noqa: E731
    else:
        out = rc.nvfp4_fake_quant(x.cuda(), amax.reshape(-1, 1, 1).cuda(), per_slice_amax=True)
        alone = lambda s, a: rq.nvfp4_fake_quant(s, a)  # noqa: E731
    assert calls == [(32, 48)] * 5
    _each_slice(out, x, amax, alone, fmt)


def test_an_amax_written_in_place_is_read_by_the_next_launch():
    """The kernel reads each slice's amax where it lies at launch time."""
    x = (torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(8)) * 3).bfloat16()
    amax = torch.tensor([3.0, 1.0, 2.0, 0.5]).reshape(-1, 1, 1).cuda()
    rc.fp8_fake_quant(x.cuda(), amax)
    amax.data[2] = 0.25
    out = rc.fp8_fake_quant(x.cuda(), amax)
    expected = torch.stack([rq.fp8_fake_quant(x[i], v) for i, v in enumerate((3.0, 1.0, 0.25, 0.5))])
    assert_bitexact(out.cpu(), expected, "after the write")
