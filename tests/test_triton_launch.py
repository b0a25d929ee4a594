"""refquant.compiled.triton_launch: our Triton kernels launched eagerly through Triton's launcher,
and the call that uses it (a bound NVFP4 fake quantizer, refquant.compiled.functions.BoundKernelLaunch).

What must hold (CUDA): a DirectLaunch runs, for any arguments, the kernel Triton itself would pick
for them (a specialization it keyed wrongly would run a kernel compiled for other alignments or
sizes); the bound launch gives the reference's bits for every input it takes, and anything it
does not take goes the ordinary way.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, cuda_at_element_offset, nvfp4_kernel_inputs

import refquant as rq
import refquant.compiled as rc
from refquant.compiled import functions
from refquant.testing import assert_bitexact

pytestmark = cuda


def _launch_args(kind: str, x: torch.Tensor, amax: torch.Tensor) -> tuple:
    """(programs, runtime arguments) of the real ("real") or fake ("fake") kernel for x."""
    blocks = x.numel() // 16
    if kind == "fake":
        return 4, (x, amax, torch.empty_like(x), blocks)
    packed = torch.empty(x.numel() // 2, dtype=torch.uint8, device=x.device)
    block_scale = torch.empty(blocks, dtype=torch.float8_e4m3fn, device=x.device)
    global_scale = torch.empty(1, dtype=torch.float32, device=x.device)
    return 4, (x, amax, global_scale, packed, block_scale, blocks)


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_a_direct_launch_runs_the_kernel_triton_picks_for_the_same_arguments(kind):
    """Pointers at 16-byte boundaries and off them, block counts of 1, multiples of 16 and others,
    x dtypes and (for the fake kernel, which reads any float amax) amax dtypes: the kernel a
    DirectLaunch keeps for the arguments' key is the very object Triton's JIT returns for them,
    and both launches write the same bits (a kernel whose result depends on how Triton lays out
    an unaligned x fails this)."""
    from refquant.compiled.nvfp4_triton import (
        FROM_AMAX_TIMES_RCP_2688,
        NUM_WARPS,
        _nvfp4_blocks_kernel,
        kernel_constants,
        outputs_written,
    )
    from refquant.compiled.nvfp4_fake_triton import NUM_WARPS as FAKE_WARPS
    from refquant.compiled.nvfp4_fake_triton import _nvfp4_fake_kernel
    from refquant.compiled.nvfp4_fake_triton import kernel_constants as fake_constants
    from refquant.compiled.triton_launch import DirectLaunch

    if kind == "fake":
        kernel, constants, warps, outputs = _nvfp4_fake_kernel, fake_constants(), FAKE_WARPS, ("y_ptr",)
    else:
        kernel, constants, warps = _nvfp4_blocks_kernel, kernel_constants(False, FROM_AMAX_TIMES_RCP_2688), NUM_WARPS
        outputs = outputs_written(FROM_AMAX_TIMES_RCP_2688)
    launch = DirectLaunch(kernel, constants, warps, outputs)
    gen = torch.Generator().manual_seed(1)
    storage = torch.randn(64 * 16 + 8, generator=gen).cuda()
    seen = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        data = storage.to(dtype)
        for offset in (0, 4, 1):  # 16-byte aligned: every dtype at 0, fp32 only at 4, none at 1
            for blocks in (1, 16, 17, 64):
                x = data[offset : offset + blocks * 16]
                for amax_dtype in (torch.float32, torch.bfloat16) if kind == "fake" else (torch.float32,):
                    amax = x.float().abs().amax().to(amax_dtype).reshape(())
                    programs, args = _launch_args(kind, x, amax)
                    key = launch.key_of(args)
                    launch(programs, *args)  # the key's first launch: through Triton's JIT
                    launch(programs, *args)  # then Triton's launcher alone (the first time, checked against the JIT's)
                    direct_out = [a.clone() for a in args if isinstance(a, torch.Tensor)]
                    picked = kernel[(programs,)](*args, **constants, num_warps=warps, enable_fp_fusion=False)
                    label = f"{dtype}, offset {offset}, {blocks} blocks, amax {amax_dtype}"
                    assert launch._compiled[key] is picked, f"{label}: not the kernel Triton picks"
                    for got, want in zip(direct_out, (a for a in args if isinstance(a, torch.Tensor))):
                        assert_bitexact(got, want, label)
                    seen.add(key)
    assert len(seen) >= 12, "the cases did not reach distinct specializations"


def _amaxes(x: torch.Tensor) -> list:
    finite = x.float()[torch.isfinite(x.float())]
    return [0.0, 1e-30, 3.0, float(finite.abs().max()), 3.0e38]


def test_a_bound_nvfp4_quantizer_launches_its_kernel_and_gives_the_reference_bits():
    """bind_fake_quant("nvfp4", x, amax) on CUDA binds the kernel's launch (BoundKernelLaunch) for
    bf16 and fp16: every bf16 pattern, fp16 input, under every kind of amax, given as fp32 and as
    bf16, gives the CPU reference's bits. fp32 binds nothing (BoundKernelLaunch says why)."""
    for name, x in nvfp4_kernel_inputs().items():
        x = x.cuda()
        if x.dtype == torch.float32:
            assert rc.bind_fake_quant("nvfp4", x, 1.0) is None, f"{name}: fp32 was bound"
            continue
        if not functions._rows_in_memory(x):  # a view the kernel cannot read in place: no launch is bound
            assert rc.bind_fake_quant("nvfp4", x, 1.0) is None, f"{name}: a launch was bound for a view it cannot read"
            continue
        for amax in _amaxes(x):
            for amax_dtype in (torch.float32, torch.bfloat16):
                given = torch.tensor(amax, dtype=amax_dtype, device="cuda")
                bound = rc.bind_fake_quant("nvfp4", x, given)
                assert isinstance(bound, functions.BoundKernelLaunch), f"{name}: the launch was not bound"
                out = bound(x)
                assert out is not None, f"{name}: the bound launch did not take its own x"
                assert_bitexact(out.cpu(), rq.nvfp4_fake_quant(x.cpu(), given.cpu()), f"{name}, amax {amax} {amax_dtype}")


def test_a_bound_nvfp4_launch_refuses_what_its_kernel_does_not_take():
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    bound = rc.bind_fake_quant("nvfp4", x, torch.tensor(3.0, device="cuda"))
    assert bound(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)) is not None
    refused = {
        "another dtype": x.half(),
        "a transposed view": torch.randn(64, 64, device="cuda", dtype=torch.bfloat16).t(),
        "the CPU": x.cpu(),
        "a last dim not a multiple of 16": torch.randn(8, 40, device="cuda", dtype=torch.bfloat16),
        "an empty tensor": x[:0],
        "a 0-d tensor": x[0, 0],
        "autograd": x.clone().requires_grad_(True),
        "fp32": x.float(),
    }
    for what, y in refused.items():
        assert bound(y) is None, what


def test_a_quantizers_nvfp4_forward_on_cuda_takes_the_bound_launch(monkeypatch):
    """After its first call, a calibrated NVFP4 quantizer's calls are launches of the kernel (no
    graph, no public function), for any leading shape, and equal the CPU reference; one that needs
    a copy (a transposed view) gets the ordinary call, right too."""
    from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer

    quantizer = TensorQuantizer(QuantizerConfig(format="nvfp4"), backend="compiled", flavor="modelopt-cuda")
    quantizer.set_amax(torch.tensor(3.0, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(3, 7, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        quantizer(x)
        assert isinstance(quantizer._bound[0], functions.BoundKernelLaunch)
        monkeypatch.setattr(rc, "nvfp4_fake_quant", lambda *a, **k: pytest.fail("the public function ran"))
        for shape in ((3, 7, 64), (5, 64), (2, 2, 9, 64)):
            y = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            assert_bitexact(quantizer(y).cpu(), rq.nvfp4_fake_quant(y.cpu(), quantizer.amax.cpu()), f"{shape}")
        monkeypatch.undo()
        y = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16).t()
        assert_bitexact(quantizer(y).cpu(), rq.nvfp4_fake_quant(y.cpu(), quantizer.amax.cpu()), "a transposed view")


def test_inside_a_users_torch_compile_nvfp4_quantize_is_traced():
    """Under a user's torch.compile, refquant.compiled's own compiled copy is not made (dynamo
    cannot trace making it): the function is inlined and the kernel's triton_op traced into their
    graph, with the reference's bits."""
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    amax = torch.tensor(3.0, device="cuda")

    @torch.compile(fullgraph=True)
    def users(x, amax):
        quantized = rc.nvfp4_quantize(x * 2, amax)
        return quantized.packed, quantized.block_scale

    packed, block_scale = users(x, amax)
    want = rq.nvfp4_quantize((x * 2).cpu(), amax.cpu())
    assert_bitexact(packed.cpu(), want.packed, "packed")
    assert_bitexact(block_scale.cpu(), want.block_scale, "block scales")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_bound_launch_takes_k_and_v_as_the_attention_gets_them_without_a_kv_cache(fmt):
    """Without a KV cache, K and V are [batch, heads, seq, head_dim] views of [batch, seq, heads,
    head_dim] memory: the launch reads them in place, and its output keeps their strides and has
    the reference's bits (bf16 and fp16, 16-byte aligned and 8 bytes off)."""
    gen = torch.Generator().manual_seed(7)
    amax = torch.tensor(3.0, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        for offset in (0, 4):
            memory = (torch.randn(2 * 8 * 4 * 32 + offset, generator=gen) * 2).to(dtype).cuda()
            x = memory[offset:].view(2, 8, 4, 32).transpose(1, 2)
            bound = rc.bind_fake_quant(fmt, x, amax, flavor="modelopt-cuda")
            assert isinstance(bound, functions.BoundKernelLaunch), f"{dtype}, offset {offset}: no launch bound"
            out = bound(x)
            assert out is not None and out.stride() == x.stride(), f"{dtype}, offset {offset}"
            if fmt == "fp8":
                want = rq.fp8_fake_quant(x.cpu(), amax.cpu(), flavor="modelopt-cuda")
            else:
                want = rq.nvfp4_fake_quant(x.cpu(), amax.cpu())
            assert_bitexact(out.cpu(), want, f"{fmt}, {dtype}, offset {offset}")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_bound_launch_looks_up_the_kernel_triton_picks_as_counts_and_alignments_change(fmt):
    """A bound call looks its compiled kernel up by what can change between its calls (the key
    of FakeQuantKernel.arguments: the count, the addresses modulo 256, the amax's dtype). Over
    x's of changing sizes (counts of 1, multiples of 16, others) and alignments, in turn and
    again, each call must run the kernel DirectLaunch keys for its arguments (the one Triton
    picks, test above) and give the reference's bits; past the look-ups it keeps, it forgets and
    finds them again. With a launch hook set, every launch goes through Triton, which calls the
    hook."""
    from triton import knobs

    from refquant.compiled import fp8_fake_triton, nvfp4_fake_triton
    from refquant.compiled.triton_launch import BOUND_KEYS_KEPT

    unit = 16 if fmt == "nvfp4" else 1
    kernel = nvfp4_fake_triton.fake_quant_kernel() if fmt == "nvfp4" else fp8_fake_triton.fake_quant_kernel("modelopt-cuda")
    storage = torch.randn(64 * 1024 + 8, generator=torch.Generator().manual_seed(5)).bfloat16().cuda() * 3
    amax = torch.tensor(2.5, device="cuda")
    bound = rc.bind_fake_quant(fmt, storage[: 16 * unit].view(-1, unit), amax, flavor="modelopt-cuda")
    assert isinstance(bound, functions.BoundKernelLaunch)
    reference = rq.nvfp4_fake_quant if fmt == "nvfp4" else lambda x, a: rq.fp8_fake_quant(x, a, flavor="modelopt-cuda")

    def check(rows: int, offset: int, label: str) -> None:
        x = storage[offset : offset + rows * unit].view(rows, unit)
        for call in range(2):  # a key's first call goes through Triton's JIT, later ones may not
            y = bound(x)
            assert y is not None, f"{label}: not taken"
            assert_bitexact(y.cpu(), reference(x.cpu(), amax.cpu()), f"{label}, call {call}")
        # a new y lies where the calls' did modulo 256 bytes (the caching allocator's blocks start
        # at multiples of 512), so these are the calls' keys
        _, args, key = kernel.arguments(x, bound._params)
        assert bound._kernels[key] is kernel.launch._compiled[kernel.launch.key_of(args)], f"{label}: another kernel"

    cases = [(rows, offset) for rows in (1, 16, 17, 4096) for offset in (0, 8)]
    for rows, offset in cases + cases[::-1]:
        check(rows, offset, f"{rows} rows, {offset} elements in")
    for rows in range(1, 2 * BOUND_KEYS_KEPT + 2):
        check(rows, 0, f"{rows} rows in a growing run")
    assert len(bound._kernels) <= BOUND_KEYS_KEPT

    entered = []

    def hook(metadata) -> None:
        entered.append(metadata)

    chain = knobs.runtime.launch_enter_hook  # Triton 3.6: a chain of hooks; older: one callable or None
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        check(16, 0, "under a launch hook")
    finally:
        if hasattr(chain, "add"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    assert entered, "the launch hook was not called"


@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_a_bound_fp8_launch_reads_its_amax_tensor_at_every_call(flavor, dtype):
    """FP8 with an amax tensor binds the launch of the FP8 kernel for bf16 and fp16 (fp32 binds
    nothing), which forms the scales from the amax at every launch: every amax regime (ordinary,
    below the 2**-24 floor, 448, huge) gives the reference's bits, and so does a value written
    into the same tensor later through `.data` (which moves no version counter)."""
    gen = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(rows, 64, generator=gen) * 40).to(dtype) for rows in (5, 2, 17)]
    amax = torch.tensor(3.0, device="cuda")
    bound = rc.bind_fake_quant("fp8", inputs[0].cuda(), amax, flavor=flavor)
    if dtype == torch.float32:
        assert bound is None, "fp32 was bound"
        return
    assert isinstance(bound, functions.BoundKernelLaunch), "nothing was bound"
    for value in (3.0, 1e-30, 448.0, 3.0e38):
        amax.data.copy_(torch.tensor(value))
        for x in inputs:
            out = bound(x.cuda())
            assert out is not None, f"{tuple(x.shape)}: the bound launch did not take it"
            assert_bitexact(out.cpu(), rq.fp8_fake_quant(x, value, flavor=flavor), f"amax {value}, {tuple(x.shape)}")


def test_nvfp4_quantize_on_cuda_with_an_amax_is_one_launch_of_the_kernel(monkeypatch):
    """With an amax given, rc.nvfp4_quantize launches the kernel itself (DirectLaunch), no graph:
    the reference's bits for bf16 (16-byte aligned: the words path; a view 8 bytes off it), fp16,
    fp32, a non-contiguous view, 3-D x, an amax in bf16 and as a float, both flavors."""
    monkeypatch.setattr(functions, "_nvfp4_quantize_with_triton_blocks", lambda: pytest.fail("the graph ran"))
    base = torch.randn(48, 80, generator=torch.Generator().manual_seed(6)) * 3
    bf16 = base[:, :64].to(torch.bfloat16).contiguous()
    cases = {  # name: (x on the CPU, x on CUDA)
        "bf16": (bf16, bf16.cuda()),
        "bf16, 8 bytes off alignment": (bf16, cuda_at_element_offset(bf16, 4)),
        "fp16": (base[:, :64].half(), base[:, :64].half().cuda()),
        "fp32": (base[:, :64].contiguous(), base[:, :64].cuda()),
        "bf16, transposed view": (bf16[:, :48].t(), bf16.cuda()[:, :48].t()),
        "bf16, 3-D": (bf16.reshape(4, 12, 64), bf16.cuda().reshape(4, 12, 64)),
    }
    for name, (x, on_device) in cases.items():
        for amax in (torch.tensor(2.5), torch.tensor(7.0, dtype=torch.bfloat16), 1.5):
            given = amax.cuda() if isinstance(amax, torch.Tensor) else amax
            for flavor in ("modelopt-cpu", "modelopt-cuda"):
                want = rq.nvfp4_quantize(x, amax, flavor=flavor)
                assert_bitexact(rc.nvfp4_quantize(on_device, given, flavor=flavor), want, f"{name}, amax {amax}, {flavor}")
