"""refquant/compiled/fp8_fake_triton.py, the Triton kernel of FP8 fake quant's element step, launched
by a bound quantizer (refquant.compiled.functions.BoundKernelLaunch) and by rc.fp8_fake_quant with a
given per-tensor amax, on CUDA.

What must hold: the reference's bits (refquant.fp8_fake_quant on the CPU) for every bf16 and
fp16 pattern, under every amax regime (ordinary, at and below
the 2**-24 floor, 448, huge) and both flavors; a calibrated FP8 quantizer's later calls, and the
public function's calls with a given amax, are launches of it (and other calls are not).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, cuda_at_element_offset, every_16_bit_pattern

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
    a binding keeps the amax tensor it was given, and a constant amax (448, the cast KV modes) is
    one tensor per device that every binding of it shares."""
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    amax = torch.tensor(3.0, device="cuda")
    rc.bind_fake_quant("fp8", x, 448.0)  # the shared constant, made once
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    bound = [rc.bind_fake_quant("fp8", x, a, flavor=flavor) for flavor in ("modelopt-cpu", "modelopt-cuda")
             for a in (amax, 448.0) for _ in range(8)]
    assert all(isinstance(b, functions.BoundKernelLaunch) for b in bound)
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_bound_launch_reads_its_amax_where_it_lives(fmt):
    """A write into the amax tensor in place, through `.data` (no version counter moves), is used
    by the next launch, bit for bit as the reference computes with the new value."""
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16) * 3
    amax = torch.tensor(3.0, device="cuda", dtype=torch.bfloat16)
    bound = rc.bind_fake_quant(fmt, x, amax, flavor="modelopt-cuda")
    assert isinstance(bound, functions.BoundKernelLaunch)
    for value in (3.0, 0.5, 448.0, 1e-30):
        amax.data.copy_(torch.tensor(value, dtype=torch.bfloat16))
        if fmt == "fp8":
            want = rq.fp8_fake_quant(x.cpu(), amax.cpu(), flavor="modelopt-cuda")
        else:
            want = rq.nvfp4_fake_quant(x.cpu(), amax.cpu())
        assert_bitexact(bound(x).cpu(), want, f"{fmt}, amax written to {value}")


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


@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp8_fake_quant_with_a_given_amax_is_one_launch_of_the_kernel_with_the_reference_bits(dtype, flavor, monkeypatch):
    """rc.fp8_fake_quant(x, amax) on CUDA, bf16 / fp16, a number or a 0-d amax: the kernel, no graph
    (the graph is made to fail), every pattern, every amax regime, contiguous and a permutation."""
    monkeypatch.setattr(functions, "_compiled_fp8_fake_quant", lambda *a, **k: pytest.fail("the graph ran"))
    x = every_16_bit_pattern(dtype).reshape(-1, 64)
    for amax in AMAXES + (0.0,):
        want = rq.fp8_fake_quant(x, amax, flavor=flavor)
        stored = torch.tensor(amax, device="cuda").bfloat16()  # as a bf16 model's quantizer stores it
        for given, expected in ((amax, want), (torch.tensor(amax, device="cuda"), want),
                                (stored, rq.fp8_fake_quant(x, stored.cpu(), flavor=flavor))):
            assert_bitexact(rc.fp8_fake_quant(x.cuda(), given, flavor=flavor).cpu(), expected, f"{dtype}, {flavor}, amax {given!r}")
        permuted = x.reshape(8, -1, 64).transpose(0, 1)  # the last dim innermost, rows in another order
        out = rc.fp8_fake_quant(permuted.cuda(), amax, flavor=flavor)
        assert out.stride() == permuted.stride(), "x's strides, as the reference keeps them"
        assert_bitexact(out.cpu(), rq.fp8_fake_quant(permuted, amax, flavor=flavor), f"permuted, amax {amax}")
        unaligned = cuda_at_element_offset(x, 1)  # a 2-byte address: another specialization of the kernel
        assert_bitexact(rc.fp8_fake_quant(unaligned, amax, flavor=flavor).cpu(), want, f"unaligned, amax {amax}")


def test_fp8_fake_quant_keeps_the_graph_where_the_launch_does_not_apply(monkeypatch):
    """fp32, an amax from x, a per-column amax, a strided view and a call under autograd go
    through the compiled reference (the kernel is made to fail), with its bits and its gradient."""
    from refquant.compiled import fp8_fake_triton

    monkeypatch.setattr(fp8_fake_triton, "fake_quant_kernel", lambda flavor: pytest.fail("the kernel was launched"))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)) * 3
    cases = {
        "fp32": (x, 3.0),
        "amax from x": (x.bfloat16(), None),
        "per-column amax": (x.bfloat16(), x.abs().amax(dim=0, keepdim=True).bfloat16()),
        "strided view": (x.bfloat16()[:, ::2], 3.0),
    }
    for name, (value, amax) in cases.items():
        on_gpu = x.bfloat16().cuda()[:, ::2] if name == "strided view" else value.cuda()  # .cuda() of a view is contiguous
        given = amax.cuda() if isinstance(amax, torch.Tensor) else amax
        assert_bitexact(rc.fp8_fake_quant(on_gpu, given).cpu(), rq.fp8_fake_quant(value, amax), name)
    leaf = x.bfloat16().cuda().requires_grad_()
    out = rc.fp8_fake_quant(leaf, 3.0)
    out.sum().backward()
    assert_bitexact(out.detach().cpu(), rq.fp8_fake_quant(x.bfloat16(), 3.0), "under autograd")
    assert torch.equal(leaf.grad, torch.ones_like(leaf)), "the straight-through gradient"
