"""refquant/compiled/fp8_fake_triton.py, the Triton kernel of FP8 fake quant's element step, launched
by a bound quantizer (refquant.compiled.functions.BoundKernelLaunch) on CUDA.

What must hold: the reference's bits (refquant.fp8_fake_quant on the CPU) for every bf16 and
fp16 pattern, under every amax regime (ordinary, at and below
the 2**-24 floor, 448, huge) and both flavors; a calibrated FP8 quantizer's later calls are
launches of it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, every_16_bit_pattern

import refquant as rq
import refquant.compiled as rc
from refquant.compiled import functions
from refquant.testing import assert_bitexact

pytestmark = cuda

AMAXES = (3.0, 2.0**-24, 1e-30, 448.0, 0.37, 3.0e38)


@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_bound_fp8_launch_gives_the_reference_bits_on_every_pattern(dtype, flavor):
    x = every_16_bit_pattern(dtype).reshape(-1, 64)
    for amax in AMAXES:
        bound = rc.bind_fake_quant("fp8", x.cuda(), amax, flavor=flavor)
        assert isinstance(bound, functions.BoundKernelLaunch), "the kernel's launch was not bound"
        for view in (x, x[:7], x.reshape(4, -1, 64)):
            out = bound(view.cuda())
            assert out is not None and out.shape == view.shape
            assert_bitexact(out.cpu(), rq.fp8_fake_quant(view, amax, flavor=flavor), f"{dtype}, {flavor}, amax {amax}, {tuple(view.shape)}")


def test_a_bound_fp8_launch_keeps_nothing_on_the_device():
    """PTQ's peak memory is held to modelopt's, whose FP8 quantizers keep nothing but their amax:
    binding reads the scales back once and passes them to every launch as fp32 arguments."""
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    amax = torch.tensor(3.0, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    bound = [rc.bind_fake_quant("fp8", x, amax, flavor=flavor) for flavor in ("modelopt-cpu", "modelopt-cuda") for _ in range(8)]
    assert all(isinstance(b, functions.BoundKernelLaunch) for b in bound)
    assert torch.cuda.memory_allocated() == before


def test_fp32_binds_the_graph_not_the_launch():
    x = torch.randn(4, 64, device="cuda")
    assert not isinstance(rc.bind_fake_quant("fp8", x, 3.0), functions.BoundKernelLaunch)


def test_a_calibrated_fp8_quantizers_later_calls_are_launches_of_the_kernel(monkeypatch):
    from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer

    quantizer = TensorQuantizer(QuantizerConfig(format="fp8"), backend="compiled", flavor="modelopt-cuda")
    quantizer.set_amax(torch.tensor(5.0, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(3, 7, 64, device="cuda", dtype=torch.bfloat16) * 3
    with torch.no_grad():
        quantizer(x)
        assert isinstance(quantizer._bound[0], functions.BoundKernelLaunch)
        monkeypatch.setattr(rc, "fp8_fake_quant", lambda *a, **k: pytest.fail("the public function ran"))
        for shape in ((3, 7, 64), (5, 64), (2, 2, 9, 40)):
            y = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 3
            want = rq.fp8_fake_quant(y.cpu(), quantizer.amax.cpu(), flavor="modelopt-cuda")
            assert_bitexact(quantizer(y).cpu(), want, f"{shape}")
