"""refquant/compiled/nvfp4_fake_triton.py, the Triton kernel of NVFP4 fake quant's block step on CUDA.

On the CPU: its rounding step, rewritten in torch, against the reference's on every input that
decides anything. On CUDA: the kernel, through refquant.compiled and called alone, against the
eager CPU reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, cuda_at_element_offset, nvfp4_kernel_inputs

import refquant as rq
import refquant.compiled as rc
from refquant.numerics.formats import E2M1_DECISION_POINTS, E4M3_DTYPE
from refquant.numerics.gpu_division import approx_reciprocal_fp32
from refquant.numerics.nvfp4 import e2m1_round_magnitude, nvfp4_fake_quant_blocks
from refquant.testing import assert_bitexact


def _kernel_rounding(u: torch.Tensor) -> torch.Tensor:
    """_e2m1_round of nvfp4_fake_triton.py in torch: add and subtract 2**22 * max(1, u's power of two)."""
    power_of_two = (u.view(torch.int32) & 0x7F800000).view(torch.float32)
    shift = torch.maximum(power_of_two, torch.tensor(1.0)) * 2.0**22
    q = (u + shift) - shift
    return torch.where(q < 6.0, q, 6.0)


def _fp32_neighbours(values: list[float], reach: int) -> torch.Tensor:
    """Every fp32 within `reach` ulps of each value (non-negative ones only)."""
    bits = torch.tensor(values, dtype=torch.float32).view(torch.int32)
    near = bits[:, None] + torch.arange(-reach, reach + 1, dtype=torch.int32)
    return near[near >= 0].view(torch.float32)


def test_kernel_rounding_equals_the_reference_rounding():
    """The kernel picks the added power of two from u's exponent instead of the reference's two
    comparisons; the rounded magnitude (after the cap at 6) is the same for every non-negative bf16,
    every fp32 near the decision points, the binade edges and the top of the range, fp32
    subnormals, inf and NaN, and a million random fp32 values."""
    gen = torch.Generator().manual_seed(11)
    bf16 = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    edges = [*E2M1_DECISION_POINTS, 0.5, 1.0, 2.0, 4.0, 6.0, 7.0, 8.0, 16.0, 2.0**23, 2.0**24, 2.0**104, 2.0**106, 3.4e38]
    special = torch.tensor([0.0, 2.0**-149, 2.0**-126, float("inf"), float("nan")])
    random = torch.randint(0, 0x7F800000, (1_000_000,), generator=gen, dtype=torch.int32).view(torch.float32)
    small = torch.rand(1_000_000, generator=gen) * 12
    u = torch.cat([bf16, _fp32_neighbours(edges, 4096), special, random, small])
    assert_bitexact(_kernel_rounding(u), e2m1_round_magnitude(u), "kernel rounding vs the reference's")


# --- CUDA -------------------------------------------------------------------------------------


def _nan_and_inf_blocks() -> torch.Tensor:
    """Blocks that are all NaN, NaN among numbers, inf among numbers, all zero, -0.0 and tiny."""
    rows = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)) * 5
    rows[0] = float("nan")
    rows[1, 3] = float("nan")
    rows[2, 7] = float("inf")
    rows[3, 0] = -float("inf")
    rows[4] = 0.0
    rows[5] = -0.0
    rows[6] = rows[6] * 1e-38
    rows[7, ::2] = float("nan")
    return rows.reshape(4, 32)


@cuda
def test_nvfp4_fake_quant_on_cuda_runs_the_triton_block_step_bit_for_bit():
    """Through refquant.compiled (CUDA, last dim a multiple of 16): every bf16 pattern in blocks,
    shuffled, fp16 and fp32, NaN and inf blocks, a transposed and a row-sliced view, every kind of
    global amax (taken from x, which gives inf or NaN for the blocks with them, zero, tiny,
    ordinary, huge); against the CPU reference."""
    from refquant.compiled import functions

    gen = torch.Generator().manual_seed(3)
    inputs = nvfp4_kernel_inputs() | {
        "fp32 wide range": torch.randn(64, 64, generator=gen) * 2.0 ** torch.randint(-140, 120, (64, 64), generator=gen),
        "NaN and inf blocks": _nan_and_inf_blocks(),
        "NaN and inf blocks, bf16": _nan_and_inf_blocks().bfloat16(),
    }
    for name, x in inputs.items():
        finite = x.float()[torch.isfinite(x.float())]
        for amax in (None, 0.0, 1e-30, 3.0, 2688.0, float(finite.abs().max()), 3.0e38):
            expected = rq.nvfp4_fake_quant(x, amax)
            actual = rc.nvfp4_fake_quant(x.cuda(), None if amax is None else torch.tensor(amax).cuda())
            assert_bitexact(actual.cpu(), expected, f"{name}, amax {amax}")
    assert functions._nvfp4_fake_quant_with_triton_blocks.cache_info().currsize == 1, "the CUDA path did not go through the Triton block step"


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_fake_block_step_on_cuda_next_to_every_decision_point(dtype):
    """The kernel alone against the reference's block step, nvfp4_fake_quant_blocks, on elements
    within 3 values of `dtype` of b * S (either side) for every E2M1 decision point b, where |x| / S rounds one way
    or the other: blocks of every E4M3 scale, under global amaxes from tiny to huge; either sign."""
    from refquant.compiled.nvfp4_fake_triton import nvfp4_fake_quant_blocks as triton_blocks

    gen = torch.Generator().manual_seed(5)
    codes = torch.arange(1, 127, dtype=torch.uint8).view(E4M3_DTYPE).float()
    # 1e-6 and the last: every block scale falls below 1e-5 and becomes 1.0 (the fallback).
    for amax in (2688.0, 1.0, 0.37, 1.0e4, 3.0e38, 1e-6, 448.0 * 6 * 2.0**-100):
        global_amax = torch.tensor(amax, dtype=torch.float32)
        g = global_amax * 0.000372023809523809  # about amax / 2688: only the block maxima depend on it
        scale = (codes * g).float()
        decision = torch.tensor(E2M1_DECISION_POINTS).double()
        centre = (decision[None, :] * scale.double()[:, None]).to(dtype)  # (scales, 7)
        step = torch.arange(-3, 4, dtype=torch.int32)
        if dtype == torch.float32:
            near = (centre.view(torch.int32)[:, :, None] + step).view(torch.float32)
        else:
            near = (centre.view(torch.int16).int()[:, :, None] + step).to(torch.int16).view(dtype).float()
        near = torch.cat([near.reshape(len(codes), 49), torch.zeros(len(codes), 11)], dim=1)
        near = near.reshape(-1, 15)  # 4 blocks a scale, 15 elements each after the block max
        block_max = (scale.double() * 6).to(dtype).float().repeat_interleave(4)[:, None]
        blocks = torch.cat([block_max, near], dim=1)
        signs = torch.where(torch.rand(blocks.shape, generator=gen) < 0.5, -1.0, 1.0)
        # Values of dtype already (fp16 at the huge amax: inf, and NaN patterns next to it).
        x = (blocks * signs).reshape(len(codes), 64).to(dtype)
        expected = nvfp4_fake_quant_blocks(x, global_amax)
        actual = triton_blocks(x.cuda(), global_amax.cuda())
        assert_bitexact(actual.cpu(), expected, f"{dtype}, global amax {amax}")


@cuda
def test_triton_fake_block_step_on_cuda_under_every_block_scale():
    """Every E4M3 block scale under one global scale: each block's max is the one that gives it,
    and its elements take every E2M1 value; R(S) is the GPU's reciprocal of each (the kernel's
    rcp.approx.ftz.f32)."""
    from refquant.compiled.nvfp4_fake_triton import nvfp4_fake_quant_blocks as triton_blocks

    global_amax = torch.tensor(1234.5)
    g = global_amax * 0.000372023809523809
    scale = torch.arange(1, 127, dtype=torch.uint8).view(E4M3_DTYPE).float() * g
    rcp = approx_reciprocal_fp32(scale)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.3, 0.8, 1.3, 1.8, 2.6, 3.6, 5.1])
    x = torch.cat([(scale * 6)[:, None], grid[None, :] / rcp[:, None]], dim=1)
    expected = nvfp4_fake_quant_blocks(x, global_amax)
    actual = triton_blocks(x.cuda(), global_amax.cuda())
    assert_bitexact(actual.cpu(), expected, "every E4M3 block scale")


@cuda
def test_triton_fake_block_step_on_cuda_under_inf_and_nan_global_amax():
    """A global amax of inf or NaN (the public functions refuse one, but max|x| of data with inf or
    NaN gives one): an infinite global scale, a NaN one that becomes the 1e-12 floor, and the
    largest finite amaxes, on blocks with and without NaN and inf."""
    from refquant.compiled.nvfp4_fake_triton import nvfp4_fake_quant_blocks as triton_blocks

    gen = torch.Generator().manual_seed(9)
    inputs = {"NaN and inf blocks": _nan_and_inf_blocks(), "random": torch.randn(16, 64, generator=gen) * 100}
    for name, x in inputs.items():
        for amax in (float("inf"), float("nan"), 3.4028235e38, 0.0, -1.0):
            global_amax = torch.tensor(amax, dtype=torch.float32)
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                actual = triton_blocks(xd.cuda(), global_amax.cuda())
                assert_bitexact(actual.cpu(), nvfp4_fake_quant_blocks(xd, global_amax), f"{name}, {dtype}, global amax {amax}")


@cuda
@pytest.mark.parametrize(
    "dtype, offset",
    [(torch.float32, 0), (torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 0), (torch.bfloat16, 1), (torch.bfloat16, 4), (torch.float16, 3)],
    ids=["fp32", "fp32 at 4 bytes", "fp32 at 8 bytes", "bf16", "bf16 at 2 bytes", "bf16 at 8 bytes", "fp16 at 6 bytes"],
)
@pytest.mark.parametrize("rows", [48, 47, 3], ids=["192 blocks", "188 blocks", "12 blocks"])
def test_the_fake_kernel_gives_the_same_bits_launch_after_launch(rows, dtype, offset):
    """The kernel launched 20 times through refquant.compiled and 20 times eagerly
    (nvfp4_fake_quant_blocks_now), x at the start of its storage and off 16-byte alignment, a
    global amax under the data's (block scales at 448) and the data's own: the reference's bits
    every time. NVFP4 real quant's kernel gave launch-to-launch different codes under layouts that
    spread a block over threads (docs/compiled.md, "Layer 2: three Triton kernels"); fp32 rows of
    8 would be such a layout in this kernel, so its fp32 path is one-dimensional."""
    from refquant.compiled.nvfp4_fake_triton import nvfp4_fake_quant_blocks_now

    x = (torch.randn(rows, 64, generator=torch.Generator().manual_seed(4)) * 7).to(dtype)
    for amax in (torch.tensor(5.5), x.float().abs().amax()):
        want = rq.nvfp4_fake_quant(x, amax)
        for launch in range(20):
            on_device = cuda_at_element_offset(x, offset)
            eager = nvfp4_fake_quant_blocks_now(on_device, amax.cuda())
            assert_bitexact(eager.cpu(), want, f"amax {float(amax)}, launch {launch}: the eager launch")
            assert_bitexact(rc.nvfp4_fake_quant(on_device, amax.cuda()).cpu(), want, f"amax {float(amax)}, launch {launch}: rc.nvfp4_fake_quant")


@cuda
def test_nvfp4_fake_quant_with_a_given_amax_is_one_launch_of_the_kernel_with_the_reference_bits(monkeypatch):
    """rc.nvfp4_fake_quant(x, amax) on CUDA, bf16 / fp16 rows in memory, a number or a 0-d amax
    (fp32, or bf16 as a bf16 model's quantizer stores it): the kernel, no graph (the graph is made
    to fail), every kind of global amax; fp32, an amax from x and a transposed x keep the graph."""
    from refquant.compiled import functions, nvfp4_fake_triton

    inputs = {name: x for name, x in nvfp4_kernel_inputs().items() if x.dtype != torch.float32 and x.is_contiguous()}
    assert len(inputs) >= 3
    shuffled = inputs["shuffled"]
    inputs["permuted"] = shuffled.reshape(2, -1, shuffled.shape[-1]).transpose(0, 1)  # rows in memory, another order
    with monkeypatch.context() as patch:
        patch.setattr(functions, "_nvfp4_fake_quant_graph", lambda *a, **k: pytest.fail("the graph ran"))
        for name, x in inputs.items():
            for amax in (0.0, 1e-30, 3.0, 2688.0, 3.0e38):
                stored = torch.tensor(amax).bfloat16()
                for given, expected in ((amax, rq.nvfp4_fake_quant(x, amax)), (torch.tensor(amax).cuda(), rq.nvfp4_fake_quant(x, amax)),
                                        (stored.cuda(), rq.nvfp4_fake_quant(x, stored))):
                    out = rc.nvfp4_fake_quant(x.cuda(), given)
                    assert out.stride() == x.stride(), f"{name}: x's strides, as the reference keeps them"
                    assert_bitexact(out.cpu(), expected, f"{name}, amax {given!r}")
    monkeypatch.setattr(nvfp4_fake_triton, "fake_quant_kernel", lambda: pytest.fail("the kernel was launched"))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 3
    for name, value, amax in (("fp32", x, 3.0), ("amax from x", x.bfloat16(), None)):
        assert_bitexact(rc.nvfp4_fake_quant(value.cuda(), amax).cpu(), rq.nvfp4_fake_quant(value, amax), name)
    transposed = x.bfloat16().cuda().t()  # the last dim strided: not rows in memory
    assert_bitexact(rc.nvfp4_fake_quant(transposed, 3.0).cpu(), rq.nvfp4_fake_quant(x.bfloat16().t(), 3.0), "transposed")


@cuda
def test_the_kernels_reciprocal_is_the_reference_table_for_every_mantissa():
    """The kernel takes R(b) from the GPU's rcp.approx.ftz.f32 (the instruction inside Triton's
    `/`, which modelopt's kernel divides with); the reference takes it from the shipped table,
    measured on an H200. For every mantissa, at exponents from the smallest divisor the kernel
    makes (fl(6 g') >= 6e-12 > 2**-38; S >= 1e-5 > 2**-17) to the largest (2**125), either sign,
    and +-inf and NaN: the same bits. On a GPU whose reciprocal differs, this test says so first."""
    from refquant.compiled.nvfp4_fake_triton import kernel_reciprocal

    mantissas = torch.arange(2**23, dtype=torch.int32, device="cuda")
    for exponent in (-38, -17, -1, 0, 1, 60, 119, 125):
        for sign in (0, -(2**31)):
            b = (mantissas | ((exponent + 127) << 23) | sign).view(torch.float32)
            assert_bitexact(kernel_reciprocal(b), approx_reciprocal_fp32(b), f"every mantissa at 2**{exponent}, sign bit {sign != 0}")
    special = torch.tensor([float("inf"), float("-inf"), float("nan")], device="cuda")
    assert_bitexact(kernel_reciprocal(special), approx_reciprocal_fp32(special), "inf, -inf, NaN")


@cuda
def test_the_fake_kernel_puts_no_reciprocal_table_on_the_device(monkeypatch):
    """The kernel's reciprocal is the instruction, so rc.nvfp4_fake_quant and a bound NVFP4
    quantizer on CUDA (last dim a multiple of 16) leave the 32 MiB table on the CPU: PTQ's peak
    memory is held to modelopt's."""
    from refquant.numerics import gpu_division

    monkeypatch.setattr(gpu_division, "_TABLES", {d: t for d, t in gpu_division._TABLES.items() if d.type == "cpu"})
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    rc.nvfp4_fake_quant(x, 3.0)
    rc.nvfp4_fake_quant(x)
    rc.bind_fake_quant("nvfp4", x, 3.0)(x)
    assert [d for d in gpu_division._TABLES if d.type != "cpu"] == []
