"""refquant.compiled against the eager reference, bit for bit (docs/compiled.md).

The eager reference on CPU is the golden one (its own tests hold it to modelopt's vectors), so
every compiled result here is compared with the reference run eagerly on the CPU: on the CPU
(inductor's C++) and, where a GPU is present, on CUDA (Triton). Inputs: every case of every
vector file, all 65,536 bf16 patterns through each function, odd leading shapes, non-contiguous
views. CPU compile time is the cost here, so graphs are shared: every size is dynamic, and the
exhaustive sweeps are one tensor per function.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import REPO, cuda, cuda_at_element_offset, every_16_bit_pattern, nvfp4_kernel_inputs, vector_cases

import refquant as rq
import refquant.compiled as rc
from refquant.compiled.options import division_rounding_option
from refquant.numerics.nvfp4 import pack_e2m1, pack_e2m1_blocks
from refquant.testing import assert_bitexact

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _on(value, device: str):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def assert_compiled_matches_reference(fn_name: str, device: str, *args, what: str = "", **kwargs) -> None:
    """compiled(args on device) == reference(args on CPU), results and their dequantize()."""
    expected = getattr(rq, fn_name)(*args, **kwargs)
    actual = getattr(rc, fn_name)(*(_on(a, device) for a in args), **{k: _on(v, device) for k, v in kwargs.items()})
    what = f"compiled {fn_name} on {device}: {what}"
    if isinstance(expected, torch.Tensor):
        assert_bitexact(actual.cpu(), expected, what)
        return
    assert isinstance(actual, type(expected)), f"{what}: got {type(actual).__name__}"
    assert_bitexact(_to_cpu(actual), expected, what)
    assert_bitexact(actual.dequantize().cpu(), expected.dequantize(), f"{what}, dequantize")


def _to_cpu(q):
    if isinstance(q, rq.NVFP4Tensor):
        return rq.NVFP4Tensor(q.packed.cpu(), q.block_scale.cpu(), q.global_scale.cpu(), q.shape, q.dtype)
    return rq.FP8Tensor(q.data.cpu(), q.scale.cpu(), q.dtype, q.block_size)


# ---------------------------------------------------------------------------------------------
# Every vector file, every case: the calls the reference's own vector tests make.
# ---------------------------------------------------------------------------------------------


def _vector_calls(file_name: str, case: dict):
    """(function name, args, kwargs) for one vector case."""
    x = case["x"]
    if file_name in ("fp8_fake_exhaustive.pt", "fp8_fake_random.pt", "fp8_fake_per_channel.pt"):
        if case.get("amax_mode") == "dynamic":
            yield "fp8_fake_quant", (x,), {"axis": case.get("axis")}
        else:
            yield "fp8_fake_quant", (x, case["amax"]), {}
    elif file_name == "fp8_real.pt":
        if case["scales_given"] is not None:
            yield "fp8_quantize", (x,), {"scale": case["scales_given"]}
        elif case["block_sizes"] is not None:
            yield "fp8_quantize", (x,), {"block_size": int(dict(case["block_sizes"])["-1"])}
        else:
            yield "fp8_quantize", (x,), {"axis": case["axis"]}
        yield "fp8_quantize", (x, x.abs().amax().float()), {}
    elif file_name == "kv_cast.pt":
        fn = "fp8_fake_quant" if case["format"] == "fp8" else "nvfp4_fake_quant"
        yield fn, (x, case["amax_used"]), {}
    else:  # nvfp4_fake.pt, nvfp4_fake_sweep.pt, nvfp4_real.pt
        amax = case["global_amax"]
        yield "nvfp4_fake_quant", (x, amax), {}
        yield "nvfp4_quantize", (x, amax), {}


VECTOR_FILES = [
    "fp8_fake_exhaustive.pt",
    "fp8_fake_random.pt",
    "fp8_fake_per_channel.pt",
    "fp8_real.pt",
    "kv_cast.pt",
    "nvfp4_fake.pt",
    "nvfp4_fake_sweep.pt",
    "nvfp4_real.pt",
]


@pytest.mark.slow  # ~150 graphs to compile on a cold CPU cache (~2.5 of this file's ~3.5 minutes)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("file_name", VECTOR_FILES)
def test_compiled_matches_reference_on_every_vector_case(file_name, device):
    for case in vector_cases(file_name):
        for fn_name, args, kwargs in _vector_calls(file_name, case):
            assert_compiled_matches_reference(fn_name, device, *args, what=case["name"], **kwargs)


# ---------------------------------------------------------------------------------------------
# All 65,536 bf16 patterns through each function, one tensor per function.
# ---------------------------------------------------------------------------------------------


def _all_bf16_patterns() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fp8_fake_quant_matches_reference_on_every_bf16_pattern(device):
    # Per-channel amax: one row of all patterns per amax (incl. 0, tiny, subnormal-range, huge).
    amaxes = torch.tensor([448.0, 1.0, 3.14159, 1e-3, 2.0**-24, 0.0, 2.0**-130, 3.0e38])
    x = _all_bf16_patterns().expand(len(amaxes), -1).contiguous()
    for flavor in ("modelopt-cpu", "modelopt-cuda"):
        assert_compiled_matches_reference("fp8_fake_quant", device, x, amaxes[:, None], flavor=flavor)
    assert_compiled_matches_reference("fp8_fake_quant", device, x[:1], amaxes[2], what="per-tensor")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_nvfp4_matches_reference_on_every_bf16_pattern(device):
    x = _all_bf16_patterns().reshape(-1, 16)
    for amax in (torch.tensor(2688.0), torch.tensor(1.0), torch.tensor(0.0), None):
        assert_compiled_matches_reference("nvfp4_fake_quant", device, x, amax, what=f"amax {amax}")
    for flavor in ("modelopt-cpu", "modelopt-cuda"):
        assert_compiled_matches_reference("nvfp4_quantize", device, x, torch.tensor(3.0e4), flavor=flavor)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fp8_quantize_matches_reference_on_every_bf16_pattern(device):
    finite = _all_bf16_patterns()
    finite = finite[torch.isfinite(finite)].reshape(-1, 16 * 255)
    for flavor in ("modelopt-cpu", "modelopt-cuda"):
        assert_compiled_matches_reference("fp8_quantize", device, finite, block_size=16, flavor=flavor)
        assert_compiled_matches_reference("fp8_quantize", device, finite, scale=torch.tensor(0.37), flavor=flavor)


# ---------------------------------------------------------------------------------------------
# Shapes, layouts, dtypes, dynamic lengths
# ---------------------------------------------------------------------------------------------


# fp16 / fp32 reach every function through the vector files; the layouts are checked in bf16 on the
# CPU (compile time) and in all three dtypes on CUDA.
ODD_SHAPE_PARAMS = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dtype, marks=cuda) for dtype in (torch.bfloat16, torch.float16, torch.float32)
]


@pytest.mark.slow
@pytest.mark.parametrize(("device", "dtype"), ODD_SHAPE_PARAMS)
def test_compiled_matches_reference_on_odd_shapes_and_non_contiguous_views(device, dtype):
    gen = torch.Generator().manual_seed(7)
    base = (torch.randn(6, 5, 96, generator=gen) * 4).to(dtype)
    views = {
        "odd 3-d": base[:, :3, :40],  # last dim not a multiple of 16, sliced: non-contiguous
        "transposed": base[0].t(),
    }
    for name, x in views.items():
        amax = x.float().abs().amax() * 0.5
        assert_compiled_matches_reference("fp8_fake_quant", device, x, amax, what=name)
        assert_compiled_matches_reference("fp8_fake_quant", device, x, what=name)
        assert_compiled_matches_reference("nvfp4_fake_quant", device, x, amax, what=name)
        assert_compiled_matches_reference("nvfp4_fake_quant", device, x, what=name)
        assert_compiled_matches_reference("nvfp4_quantize", device, x, what=name)
        assert_compiled_matches_reference("fp8_quantize", device, x, what=name)


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("device", DEVICES)
def test_changing_sequence_lengths_do_not_recompile(device):
    amax = torch.tensor(2.0, device=device)
    # Warm-up: whatever graphs these configurations need (bf16, amax given) exist after this.
    for length in (7, 8):
        x = torch.randn(2, length, 48, device=device, dtype=torch.bfloat16)
        rc.fp8_fake_quant(x, amax)
        rc.nvfp4_fake_quant(x, amax)
        rc.nvfp4_quantize(x, amax)
    before = _graphs_compiled()
    for length in (5, 13, 100, 333):
        x = torch.randn(3, length, 48, device=device, dtype=torch.bfloat16)
        assert_bitexact(rc.fp8_fake_quant(x, amax).cpu(), rq.fp8_fake_quant(x.cpu(), amax.cpu()))
        assert_bitexact(rc.nvfp4_fake_quant(x, amax).cpu(), rq.nvfp4_fake_quant(x.cpu(), amax.cpu()))
        rc.nvfp4_quantize(x, amax)
    assert _graphs_compiled() == before, "a new sequence length compiled a new graph"


# ---------------------------------------------------------------------------------------------
# The wrapper: errors, scoping of options, the quantizer backend
# ---------------------------------------------------------------------------------------------


def test_compiled_functions_raise_the_reference_errors():
    x = torch.randn(4, 32)
    for call in (
        lambda m: m.fp8_quantize(x, 1.0, scale=2.0),
        lambda m: m.nvfp4_fake_quant(x, torch.ones(2)),
        lambda m: m.fp8_fake_quant(x, -1.0),
        lambda m: m.fp8_fake_quant(x, torch.tensor(float("nan"))),
        lambda m: m.fp8_fake_quant(x, 1.0, flavor="gpu"),
        lambda m: m.nvfp4_quantize(torch.tensor(1.0)),
        lambda m: m.fp8_fake_quant(x.to(torch.int32)),
    ):
        with pytest.raises(ValueError) as reference_error:
            call(rq)
        with pytest.raises(ValueError) as compiled_error:
            call(rc)
        assert str(compiled_error.value) == str(reference_error.value)


def test_compile_options_leave_global_settings_untouched():
    division = division_rounding_option()
    read = lambda: (  # noqa: E731
        inductor_config.eager_numerics.division_rounding if division.startswith("eager_numerics") else getattr(inductor_config, division),
        inductor_config.emulate_precision_casts,
        torch._dynamo.config.recompile_limit,
    )
    before = read()
    rc.fp8_fake_quant(torch.randn(4, 32), 1.0)
    assert read() == before
    assert rc.inductor_options()[division] is True and rc.inductor_options()["emulate_precision_casts"] is True


def test_torch_without_per_function_limits_still_compiles_past_the_global_limit(monkeypatch):
    """torch < 2.13 (the H100's 2.11) has no torch.compile(recompile_limit=): _run retries a call
    that hit the global limit (8 graphs) with the limit raised for that call only."""
    from refquant.compiled import functions

    monkeypatch.setattr(functions, "LIMIT_PER_FUNCTION", False)
    twice = torch.compile(lambda x: x * 2, fullgraph=True, dynamic=False)  # a graph per shape
    limit = torch._dynamo.config.recompile_limit
    for n in range(1, limit + 4):
        x = torch.arange(n, dtype=torch.float32)
        assert torch.equal(functions._run(twice, lambda x: x * 2, x), x * 2)
    assert torch._dynamo.config.recompile_limit == limit


def _scaled(x: torch.Tensor, flavor: str = "modelopt-cpu") -> torch.Tensor:
    return x * (2 if flavor == "modelopt-cpu" else 3)


def test_one_torch_compile_per_call_signature():
    """CompiledPerSignature: a new signature (dtype, rank, an option) gets its own torch.compile,
    on a copy of the function with a code object of its own (dynamo's graphs live on code
    objects); new row counts reuse the signature's."""
    from refquant.compiled.options import CompiledPerSignature

    per_signature = CompiledPerSignature(_scaled)
    rows_2 = per_signature.for_call((torch.ones(2, 8),), {})
    assert per_signature.for_call((torch.ones(5, 8),), {}) is rows_2
    others = [
        per_signature.for_call((torch.ones(2, 8, dtype=torch.bfloat16),), {}),
        per_signature.for_call((torch.ones(2, 3, 8),), {}),
        per_signature.for_call((torch.ones(2, 8),), {"flavor": "modelopt-cuda"}),
    ]
    code_objects = {id(_scaled.__code__)} | {id(inspect.unwrap(c).__code__) for c in [rows_2, *others]}
    assert len(code_objects) == 5, "each signature needs a code object of its own"
    assert torch.equal(rows_2(torch.ones(5, 8)), torch.full((5, 8), 2.0))
    assert torch.equal(others[2](torch.ones(2, 8), flavor="modelopt-cuda"), torch.full((2, 8), 3.0))


def _halved(x: torch.Tensor, amax: torch.Tensor, flavor: str = "a") -> torch.Tensor:
    return (x.float() * (0.5 if flavor == "a" else 0.25) / amax).to(x.dtype)


def test_calls_of_any_row_count_share_the_first_calls_graph():
    """Through _run (rows marked dynamic, as the public functions call): after the first call of a
    signature, other row counts take its graph, with eager's bits."""
    from refquant.compiled import functions
    from refquant.compiled.options import CompiledPerSignature

    own = types.FunctionType(_halved.__code__.replace(co_name="_halved_rows"), globals(), None, _halved.__defaults__)
    per_signature = CompiledPerSignature(own)
    amax = torch.tensor(3.0)
    first = torch.randn(8, 32, dtype=torch.bfloat16)
    assert_bitexact(functions._run(per_signature, own, functions._rows(first), amax), _halved(first, amax))
    before = _graphs_compiled()
    for rows in (2, 5, 300):
        x = torch.randn(rows, 32, dtype=torch.bfloat16)
        assert_bitexact(functions._run(per_signature, own, functions._rows(x), amax), _halved(x, amax), f"{rows} rows")
    assert _graphs_compiled() == before, "another row count compiled a new graph"


@pytest.mark.parametrize(
    "what, make",
    [
        ("another dtype", lambda: (torch.randn(8, 32, dtype=torch.float16), {})),
        ("a transposed view", lambda: (torch.randn(32, 8, dtype=torch.bfloat16).t(), {})),
        ("one row", lambda: (torch.randn(1, 32, dtype=torch.bfloat16), {})),
        ("another flavor", lambda: (torch.randn(8, 32, dtype=torch.bfloat16), {"flavor": "b"})),
        ("a tensor that requires grad, under grad mode", lambda: (torch.randn(8, 32, dtype=torch.bfloat16).requires_grad_(), {})),
    ],
)
def test_a_call_the_first_graph_does_not_fit_compiles_its_own_and_is_right(what, make):
    """A call the first graph's guards reject (or whose signature is another) compiles a graph of
    its own, with eager's bits; the next such call takes that graph."""
    from refquant.compiled import functions
    from refquant.compiled.options import CompiledPerSignature

    # a function of its own name per case: dynamo keeps what it learnt about sizes per function
    # name and line, and the cases would otherwise teach each other
    own = types.FunctionType(_halved.__code__.replace(co_name=f"_halved_{abs(hash(what))}"), globals(), None, _halved.__defaults__)
    per_signature = CompiledPerSignature(own)
    amax = torch.tensor(3.0)
    functions._run(per_signature, own, torch.randn(8, 32, dtype=torch.bfloat16), amax)
    x, kwargs = make()
    before = _graphs_compiled()
    out = functions._run(per_signature, own, x, amax, **kwargs)
    assert _graphs_compiled() == before + 1, f"{what}: the first graph should not fit it"
    assert_bitexact(out.detach(), _halved(x.detach(), amax, **kwargs), what)
    again = functions._run(per_signature, own, x, amax, **kwargs)
    assert _graphs_compiled() == before + 1, f"{what}: the new graph was not used again"
    assert_bitexact(again.detach(), out.detach(), what)


@pytest.mark.parametrize("device", DEVICES)
def test_the_public_functions_give_the_reference_bits_on_a_weight_and_a_kv_view_without_recompiling(device):
    """A weight (a Parameter), K/V's transposed layout, a constant amax and an amax from x: the
    reference's bits on the first call and again, the second round compiling nothing."""
    weight = torch.nn.Parameter(torch.randn(16, 64, dtype=torch.bfloat16, device=device))
    states = torch.randn(2, 4, 5, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)  # a K/V layout: not contiguous
    amax = torch.tensor(2.5, device=device)
    calls = [
        (rc.fp8_fake_quant, rq.fp8_fake_quant, weight, amax),
        (rc.fp8_fake_quant, rq.fp8_fake_quant, states, 448.0),
        (rc.nvfp4_fake_quant, rq.nvfp4_fake_quant, weight, amax),
        (rc.nvfp4_fake_quant, rq.nvfp4_fake_quant, states, None),
    ]
    with torch.no_grad():
        for compiled, reference, x, a in calls:
            compiled(x, a)
        before = _graphs_compiled()
        for compiled, reference, x, a in calls:
            cpu_amax = a.cpu() if isinstance(a, torch.Tensor) else a
            expected = reference(x.detach().cpu(), cpu_amax)
            assert_bitexact(compiled(x, a).cpu(), expected, f"{compiled.__name__} of {tuple(x.shape)} on {device}")
    assert _graphs_compiled() == before, "a second call compiled a new graph"


@cuda
def test_nvfp4_quantize_on_cuda_with_the_amax_from_x_gives_the_reference_bits_for_any_row_count():
    """With the amax taken from x, rc.nvfp4_quantize runs its graph (the reduction fused, the block
    step our kernel): after the first call, other row counts take that graph."""
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    rc.nvfp4_quantize(x)
    before = _graphs_compiled()
    for rows in (64, 3, 200):
        y = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
        got, want = rc.nvfp4_quantize(y), rq.nvfp4_quantize(y.cpu())
        assert_bitexact(got.packed.cpu(), want.packed, f"{rows} rows, packed")
        assert_bitexact(got.block_scale.cpu(), want.block_scale, f"{rows} rows, block scales")
        assert_bitexact(got.global_scale.cpu(), want.global_scale, f"{rows} rows, global scale")
    assert _graphs_compiled() == before, "another row count compiled a new graph"


def test_inside_a_users_torch_compile_the_functions_are_traced_as_before():
    amax = torch.tensor(2.0)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    rc.fp8_fake_quant(x, amax)  # a graph of refquant's own exists already

    def user(x):
        return rc.fp8_fake_quant(x, amax) * 2 + rc.nvfp4_fake_quant(x, amax)

    expected = rq.fp8_fake_quant(x, amax) * 2 + rq.nvfp4_fake_quant(x, amax)
    assert_bitexact(torch.compile(user, backend="eager", fullgraph=True)(x), expected)


def test_a_quantized_model_under_a_users_torch_compile_gives_the_eager_logits():
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_cast_kv"), [ids], backend="compiled", flavor="modelopt-cpu", progress=False)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        traced = torch.compile(model, backend="eager")(input_ids=ids).logits
        with rq.quant.quantizer.all_quantizers_off(model):
            plain = model(input_ids=ids).logits
    assert_bitexact(traced, eager, "the quantized model through dynamo")
    assert not torch.equal(eager, plain), "the quantizers did nothing"


@cuda
def test_nvfp4_quantize_on_cuda_runs_the_triton_block_step_bit_for_bit():
    """refquant/compiled/nvfp4_triton.py (CUDA, last dim a multiple of 16) against the eager CPU reference:
    every bf16 pattern in blocks, shuffled, exact ties on the E2M1 decision points, fp16 / fp32,
    a transposed and a row-sliced view, every kind of amax (zero, tiny, given, taken from x), both
    flavors."""
    from refquant.compiled import functions

    for name, x in nvfp4_kernel_inputs().items():
        finite = x.float()[torch.isfinite(x.float())]
        for amax in (None, 0.0, 1e-30, 3.0, 2688.0, float(finite.abs().max())):
            for flavor in ("modelopt-cpu", "modelopt-cuda"):
                assert_compiled_matches_reference("nvfp4_quantize", "cuda", x, amax, flavor=flavor, what=f"{name}, amax {amax}, {flavor}")
    assert functions._nvfp4_quantize_with_triton_blocks.cache_info().currsize == 1, "the CUDA path did not go through the Triton block step"


def _fp32_round(exact: torch.Tensor, toward: float) -> torch.Tensor:
    """float64 values -> the nearest fp32 in direction `toward` (+inf or -inf): RU or RD."""
    nearest = exact.float()
    wrong_side = (nearest.double() < exact) if toward > 0 else (nearest.double() > exact)
    return torch.where(wrong_side, torch.nextafter(nearest, torch.tensor(toward)), nearest)


def _element_thresholds(divisor: torch.Tensor) -> torch.Tensor:
    """(n, 8) fp32: for each fp32 divisor d, the 8 magnitudes where the reference's element code
    changes (docstring of refquant/compiled/nvfp4_triton.py), computed here independently in float64,
    where (b +- h) * d is exact: RD(d * 2**-150), then RD((b + h) d) / RU((b - h) d) for each
    E2M1 decision point b by its tie direction (h = half an fp32 ulp of b)."""
    from refquant.numerics.formats import E2M1_DECISION_POINTS, E2M1_TIE_ROUNDS_UP

    d = divisor.double()
    columns = [_fp32_round(d * 2.0**-150, -1.0)]
    for b, tie_up in zip(E2M1_DECISION_POINTS, E2M1_TIE_ROUNDS_UP):
        h = 2.0 ** (torch.tensor(b).log2().floor().item() - 24)
        columns.append(_fp32_round((b - h) * d, 1.0) if tie_up else _fp32_round((b + h) * d, -1.0))
    return torch.stack(columns, dim=-1)


def _steps_around(thresholds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 8) fp32 thresholds -> (n, 8 * 5) values of `dtype` (as fp32) at and around each: the
    two nearest values of `dtype` either side and the ones next to those."""
    bits = thresholds.view(torch.int32)
    if dtype == torch.float32:
        near = bits[:, :, None] + torch.tensor([-2, -1, 0, 1, 2], dtype=torch.int32)
        return near.clamp(min=0).view(torch.float32).flatten(1)
    below = torch.bitwise_right_shift(bits, 16)  # bf16 bits of RD_bf16(t), t >= 0
    near = below[:, :, None] + torch.tensor([-1, 0, 1, 2, 3], dtype=torch.int32)  # RU_bf16(t) is `below` or `below + 1`
    return (near.clamp(min=0) << 16).view(torch.float32).flatten(1)


def test_threshold_method_reproduces_the_division_on_every_bf16_pattern():
    """The method of refquant/compiled/nvfp4_triton.py, on the CPU: for every bf16 pattern, under every
    E4M3 block scale and global scales across the window, the codes decided by comparing |x| with
    the eight thresholds (computed independently here in float64; as fp32 values, and rounded
    onto bf16 as the kernel's bf16 path does) equal the reference's codes from the IEEE division.
    (The kernel's own arithmetic, FMAs in directed rounding, is held to the reference on CUDA.)"""
    from refquant.numerics.formats import E2M1_TIE_ROUNDS_UP
    from refquant.numerics.nvfp4 import e2m1_magnitude_index

    x = every_16_bit_pattern(torch.bfloat16).float()
    a = x.abs()
    scales = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for g in (2.0**-90, 1 / 2688, 0.37, 1.0, 3.3895e38 / 2688, 2.0**100):
        divisor = scales * torch.tensor(g, dtype=torch.float32)
        u = x / divisor[:, None]
        expected = e2m1_magnitude_index(u.abs()).int() | ((u < 0).int() << 3)
        thresholds = _element_thresholds(divisor)
        bits = thresholds.view(torch.int32)
        round_up = torch.tensor((False, *E2M1_TIE_ROUNDS_UP))
        onto_bf16 = torch.where(round_up, bits + 0xFFFF, bits) & ~0xFFFF  # RU / RD to bf16 (t >= 0)
        for name, t in (("fp32", thresholds), ("bf16", onto_bf16.view(torch.float32))):
            t = t[:, :, None]
            passed = [(a >= t[:, k]) if round_up[k] else (a > t[:, k]) for k in range(1, 8)]
            index = torch.where(a.isnan(), 7, sum(p.int() for p in passed))
            # fp32 path: the sign bit of x where |x| passes t0; bf16 path: x < -t0, on the signed pair
            negative = (x < -t[:, 0]) if name == "bf16" else (torch.signbit(x) & (a > t[:, 0]))
            codes = index | (negative.int() << 3)
            differ = int((codes != expected).sum())
            assert differ == 0, f"{name} thresholds, global scale {g}: {differ} of {codes.numel()} codes differ"


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_block_step_on_cuda_matches_the_division_next_to_every_threshold(dtype):
    """The Triton block step decides element codes by comparisons with per-block thresholds in
    place of the division (fp32 thresholds; for bf16, rounded onto bf16 and compared two elements
    at a time). Here every element sits on a threshold or within two values of `dtype` of it
    (either sign), in blocks of every E4M3 scale, under global scales inside the threshold path's
    window (its edges included) and outside it (the division path), against the CPU reference's
    nvfp4_quantize_blocks under the same global scale. Also a bf16 tensor at an odd element
    offset, which cannot be read as words of two bf16, and one 8 bytes off 16-byte alignment: both
    take the fp32 path."""
    from refquant.compiled.nvfp4_triton import nvfp4_quantize_blocks as triton_blocks
    from refquant.numerics.nvfp4 import nvfp4_quantize_blocks as reference_blocks

    gen = torch.Generator().manual_seed(5)
    scales = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    inside = [2.0**-90, 2.0**100, 1.0, 1 / 2688, 3.3895e38 / 2688] + (2.0 ** (torch.rand(12, generator=gen) * 180 - 85)).tolist()
    outside = [2.0**-91, 2.0**-120, 2.0**101, 0.0]
    for g in inside + outside:
        global_scale = torch.tensor(g, dtype=torch.float32)
        divisor = scales * global_scale  # fp32, as the kernel and the reference compute it
        near = _steps_around(_element_thresholds(divisor), dtype)  # 40 magnitudes a scale
        near = torch.cat([near, near[:, :5]], dim=1).reshape(-1, 15)  # 3 blocks a scale, 15 each
        # A first element of 6 g s (rounded) gives the block the scale s.
        block_max = (scales.double() * (global_scale * 6.0).double()).to(dtype).float()
        blocks = torch.cat([block_max.repeat_interleave(3)[:, None], near], dim=1)
        signs = torch.where(torch.rand(blocks.shape, generator=gen) < 0.5, -1.0, 1.0)
        x = (blocks * signs).reshape(len(scales), 48).to(dtype)
        assert torch.equal(x.float(), (blocks * signs).reshape(len(scales), 48)), "the inputs must be exact in dtype"
        expected = reference_blocks(x, global_scale)
        views = {"contiguous": x.cuda()}
        if dtype == torch.bfloat16:
            views["odd element offset"] = cuda_at_element_offset(x, 1)
            views["8 bytes off alignment"] = cuda_at_element_offset(x, 4)
        for name, view in views.items():
            actual = triton_blocks(view, global_scale.cuda())
            assert_bitexact(actual[1].cpu(), expected[1], f"block scales, {name}, global scale {g}")
            assert_bitexact(actual[0].cpu(), expected[0], f"packed codes, {name}, global scale {g}")


def test_compiled_results_dequantize_through_the_compiled_class():
    x = torch.randn(3, 32)
    assert isinstance(rc.nvfp4_quantize(x), rc.NVFP4Tensor) and isinstance(rc.nvfp4_quantize(x), rq.NVFP4Tensor)
    assert isinstance(rc.fp8_quantize(x), rc.FP8Tensor) and isinstance(rc.fp8_quantize(x), rq.FP8Tensor)


def test_quantizer_with_compiled_backend_gives_the_reference_bits():
    from refquant.quant.quantizer import QuantizerConfig, TensorQuantizer

    x = torch.randn(2, 9, 64, dtype=torch.bfloat16)
    for config in (QuantizerConfig(format="fp8"), QuantizerConfig(format="nvfp4"), QuantizerConfig(format="fp8", axis=-1)):
        outputs = []
        for backend in ("reference", "compiled"):
            quantizer = TensorQuantizer(config, backend=backend)
            quantizer.start_calibration()
            quantizer(x)
            quantizer.finish_calibration()
            outputs.append(quantizer(x))
        assert_bitexact(outputs[1], outputs[0], f"TensorQuantizer {config}")


def test_block_packing_matches_pairwise_packing():
    codes = torch.randint(0, 16, (5, 3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    codes[0, 0] = 15  # the top nibble carries the int64 word's sign bit
    codes[0, 1] = torch.arange(16)
    assert torch.equal(pack_e2m1_blocks(codes), pack_e2m1(codes.flatten(-2)))


@cuda
@pytest.mark.parametrize(
    "dtype, offset",
    [(torch.float32, 0), (torch.float32, 1), (torch.float16, 0), (torch.float16, 3), (torch.bfloat16, 4), (torch.bfloat16, 1), (torch.bfloat16, 0)],
    ids=["fp32", "fp32 at 4 bytes", "fp16", "fp16 at 6 bytes", "bf16 at 8 bytes", "bf16 at 2 bytes", "bf16"],
)
@pytest.mark.parametrize("rows", [48, 47, 3], ids=["192 blocks", "188 blocks", "12 blocks"])
def test_nvfp4_real_kernel_on_cuda_gives_the_same_bits_launch_after_launch(rows, dtype, offset):
    """NVFP4 real quant's kernel launched eagerly and through refquant.compiled, 20 times each,
    both flavors, values well past the amax (block scales at 448), x at the start of its storage
    and off 16-byte alignment: the reference's bits every time. On an H200, compiles whose 2-D tiles
    Triton spread over several threads (fp32 x in (BLOCKS, 16) tiles; (BLOCKS, 4) tiles of an x 8
    bytes off alignment) gave hundreds of wrong bytes of 1536, a different count from one launch
    of the same compiled kernel to the next (docs/compiled.md, "Layer 2: three Triton kernels")."""
    from refquant.compiled.nvfp4_triton import nvfp4_quantize_from_amax

    x = (torch.randn(rows, 64, generator=torch.Generator().manual_seed(2)) * 7).to(dtype)
    amax = torch.tensor(5.5)
    for flavor in ("modelopt-cpu", "modelopt-cuda"):
        want = rq.nvfp4_quantize(x, amax, flavor=flavor)
        for launch in range(20):
            on_device = cuda_at_element_offset(x, offset)
            packed, block_scale, global_scale = nvfp4_quantize_from_amax(on_device, amax.cuda(), flavor == "modelopt-cpu")
            got = rc.nvfp4_quantize(on_device, amax.cuda(), flavor=flavor)
            label = f"{flavor}, launch {launch}"
            assert_bitexact(packed.cpu(), want.packed, f"{label}: the eager kernel's packed bytes")
            assert_bitexact(block_scale.cpu(), want.block_scale, f"{label}: the eager kernel's block scales")
            assert_bitexact(global_scale.cpu().reshape(()), want.global_scale, f"{label}: the eager kernel's global scale")
            assert_bitexact(got.packed.cpu(), want.packed, f"{label}: rc.nvfp4_quantize's packed bytes")
            assert_bitexact(got.block_scale.cpu(), want.block_scale, f"{label}: rc.nvfp4_quantize's block scales")


def test_per_slice_nvfp4_decodes_the_reciprocal_table_before_the_graph_reads_it():
    """A process whose first NVFP4 call is the per-expert (per-slice) one: the GPU-division table is
    decoded eagerly, never inside the traced graph (dynamo cannot trace the file read)."""
    import subprocess
    import sys

    script = (
        "import torch, refquant as rq, refquant.compiled as rc\n"
        "x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0)).bfloat16()\n"
        "amax = x.abs().amax(dim=(1, 2), keepdim=True)\n"
        "y = rc.nvfp4_fake_quant(x, amax, per_slice_amax=True)\n"
        "want = torch.stack([rq.nvfp4_fake_quant(x[i], amax[i].reshape(())) for i in range(4)])\n"
        "assert torch.equal(y.view(torch.int16), want.view(torch.int16))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
