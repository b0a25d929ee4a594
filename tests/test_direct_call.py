"""refquant.compiled.direct_call: compiled graphs called without dynamo's dispatch, behind dynamo's
own guards, and the quantizers' shared input result (refquant.quant.quantizer.SharedInputResult).

What must hold: a call that the graph's guards accept gives the graph's bits without going
through dynamo; any call they reject (another dtype, requires_grad under grad mode, a transposed
view, one row where the graph was traced for many) goes through dynamo and gives the right bits;
inside a user's torch.compile the functions are traced as before; a tensor fed to several
quantizers with equal settings is quantized once, and never reused once anything changed.
"""

from __future__ import annotations

import gc
import types

import pytest
import torch

import refquant as rq
import refquant.compiled as rc
from refquant.compiled import functions
from refquant.compiled.options import CompiledPerSignature
from refquant.quant.quantizer import QuantizerConfig, SharedInputResult, TensorQuantizer
from refquant.testing import assert_bitexact
from conftest import cuda, cuda_at_element_offset


def _halved(x: torch.Tensor, amax: torch.Tensor, flavor: str = "a") -> torch.Tensor:
    return (x.float() * (0.5 if flavor == "a" else 0.25) / amax).to(x.dtype)


def _entry(per_signature: CompiledPerSignature, *args, **kwargs):
    return per_signature.for_call(args, kwargs)


def _quantized_tiny_llama(recipe: str, seed: int, backend: str = "compiled", device: str = "cpu"):
    """conftest's tiny Llama on `device`, quantized with `recipe` on one batch of ids (the modelopt
    flavor of that device); (model, ids)."""
    from conftest import tiny_llama

    model = tiny_llama().to(device)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)).to(device)
    flavor = "modelopt-cuda" if device == "cuda" else "modelopt-cpu"
    rq.quantize_model(model, rq.load_recipe(recipe), [ids], backend=backend, flavor=flavor, progress=False)
    return model, ids


def _no_dynamo(entry, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this call went through dynamo")

    monkeypatch.setattr(entry, "dynamo", refuse)


def test_after_the_first_call_calls_of_any_row_count_skip_dynamo(monkeypatch):
    per_signature = CompiledPerSignature(_halved, prepare=functions._marked)
    amax = torch.tensor(3.0)
    first = torch.randn(8, 32, dtype=torch.bfloat16)
    entry = _entry(per_signature, functions._rows(first), amax)
    assert_bitexact(entry(first, amax), _halved(first, amax))
    assert entry.direct_graphs == 1 and entry.calls_through_dynamo == 1
    _no_dynamo(entry, monkeypatch)
    for rows in (2, 5, 300):
        x = torch.randn(rows, 32, dtype=torch.bfloat16)
        assert_bitexact(entry(x, amax), _halved(x, amax), f"{rows} rows, direct")
    assert entry.calls_through_dynamo == 1


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
def test_a_call_the_graphs_guards_reject_goes_through_dynamo_and_is_right(what, make):
    # a function of its own name per case: dynamo keeps what it learnt about sizes per function
    # name and line, and the cases would otherwise teach each other
    own = types.FunctionType(_halved.__code__.replace(co_name=f"_halved_{abs(hash(what))}"), globals(), None, _halved.__defaults__)
    per_signature = CompiledPerSignature(own, prepare=functions._marked)
    amax = torch.tensor(3.0)
    x0 = torch.randn(8, 32, dtype=torch.bfloat16)
    entry = _entry(per_signature, x0, amax)
    entry(x0, amax)
    x, kwargs = make()
    through_dynamo = entry.calls_through_dynamo
    out = entry(x, amax, **kwargs)
    assert entry.calls_through_dynamo == through_dynamo + 1, f"{what}: the first graph's guards should reject it"
    assert_bitexact(out.detach(), _halved(x.detach(), amax, **kwargs), what)
    again = entry(x, amax, **kwargs)  # the graph dynamo just compiled is called directly from now on
    assert entry.calls_through_dynamo == through_dynamo + 1, f"{what}: the new graph was not adopted"
    assert_bitexact(again.detach(), out.detach(), what)


def test_a_result_that_is_not_tensors_stays_on_dynamos_path():
    x = torch.randn(4, 32)
    rc.nvfp4_quantize(x, 2.0)  # the reference's NVFP4Tensor, a dataclass
    entries = list(functions._compiled_nvfp4_quantize._compiled.values())
    assert entries and all(entry.direct_graphs == 0 for entry in entries)
    assert_bitexact(rc.nvfp4_quantize(x, 2.0), rq.nvfp4_quantize(x, 2.0))


def _halved_and_doubled(x: torch.Tensor, amax: torch.Tensor):
    return _halved(x, amax), (x.float() * 2.0).to(x.dtype), amax * 3


def _halved_and_a_number(x: torch.Tensor, amax: torch.Tensor):
    return _halved(x, amax), 2.0


def test_a_tuple_of_tensors_is_called_directly_and_a_tuple_with_a_number_is_not(monkeypatch):
    amax = torch.tensor(1.5)
    tensors = CompiledPerSignature(_halved_and_doubled, prepare=functions._marked)
    entry = _entry(tensors, torch.randn(3, 8), amax)
    entry(torch.randn(3, 8), amax)
    assert entry.direct_graphs == 1, "a tuple of tensors was not adopted"
    _no_dynamo(entry, monkeypatch)
    for rows in (2, 9):
        x = torch.randn(rows, 8)
        out = entry(x, amax)
        assert isinstance(out, tuple) and len(out) == 3
        for got, want in zip(out, (_halved(x, amax), x * 2.0, amax * 3)):
            assert_bitexact(got, want, f"{rows} rows")
    mixed = CompiledPerSignature(_halved_and_a_number, prepare=functions._marked)
    entry = _entry(mixed, torch.randn(3, 8), amax)
    entry(torch.randn(3, 8), amax)
    assert entry.direct_graphs == 0, "a tuple with a number in it cannot be the graph's outputs"


@cuda
def test_nvfp4_quantize_on_cuda_is_called_directly():
    """With the amax taken from x, rc.nvfp4_quantize runs its graph (the reduction fused), called
    directly after the first call; with an amax given it is one launch of the kernel (below)."""
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    rc.nvfp4_quantize(x)
    # this signature's compiled function (other tests in the process make others: other dtypes,
    # last dims, views off 16-byte alignment, which compile graphs of their own)
    entry = _entry(functions._nvfp4_quantize_with_triton_blocks(), x, None, flavor="modelopt-cpu")
    assert entry.direct_graphs == 1
    before = entry.calls_through_dynamo
    for rows in (64, 3, 200):
        y = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
        got, want = rc.nvfp4_quantize(y), rq.nvfp4_quantize(y.cpu())
        assert_bitexact(got.packed.cpu(), want.packed, f"{rows} rows, packed")
        assert_bitexact(got.block_scale.cpu(), want.block_scale, f"{rows} rows, block scales")
        assert_bitexact(got.global_scale.cpu(), want.global_scale, f"{rows} rows, global scale")
    assert entry.calls_through_dynamo == before, "a call went through dynamo"


@cuda
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_public_functions_call_their_graphs_directly_and_give_the_reference_bits(monkeypatch, device):
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
        entries = [e for c in (functions._compiled_fp8_fake_quant, functions._compiled_nvfp4_fake_quant) for e in c._compiled.values()]
        for entry in entries:
            _no_dynamo(entry, monkeypatch)
        for compiled, reference, x, a in calls:
            cpu_amax = a.cpu() if isinstance(a, torch.Tensor) else a
            expected = reference(x.detach().cpu(), cpu_amax)
            assert_bitexact(compiled(x, a).cpu(), expected, f"{compiled.__name__} of {tuple(x.shape)} on {device}")


def test_inside_a_users_torch_compile_the_functions_are_traced_as_before():
    amax = torch.tensor(2.0)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    rc.fp8_fake_quant(x, amax)  # a direct graph exists already

    def user(x):
        return rc.fp8_fake_quant(x, amax) * 2 + rc.nvfp4_fake_quant(x, amax)

    expected = rq.fp8_fake_quant(x, amax) * 2 + rq.nvfp4_fake_quant(x, amax)
    assert_bitexact(torch.compile(user, backend="eager", fullgraph=True)(x), expected)


def test_a_quantized_model_under_a_users_torch_compile_gives_the_eager_logits():
    model, ids = _quantized_tiny_llama("nvfp4_default-fp8_cast_kv", 0)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        traced = torch.compile(model, backend="eager")(input_ids=ids).logits
        with rq.quant.quantizer.all_quantizers_off(model):
            plain = model(input_ids=ids).logits
    assert_bitexact(traced, eager, "the quantized model through dynamo")
    assert not torch.equal(eager, plain), "the quantizers did nothing"


# ---------------------------------------------------------------------------------------------
# SharedInputResult
# ---------------------------------------------------------------------------------------------


def _calibrated(amax: float, fmt: str = "fp8", shared: SharedInputResult | None = None) -> TensorQuantizer:
    quantizer = TensorQuantizer(QuantizerConfig(format=fmt))
    quantizer.set_amax(torch.tensor(amax))
    quantizer.shared_input_result = shared
    return quantizer


def _counting(monkeypatch) -> list:
    computed = []
    original = TensorQuantizer._fake_quant

    def counted(self, x, amax_value):
        computed.append(self)
        return original(self, x, amax_value)

    monkeypatch.setattr(TensorQuantizer, "_fake_quant", counted)
    return computed


def test_one_tensor_into_quantizers_of_equal_settings_is_quantized_once(monkeypatch):
    shared = SharedInputResult()
    q, k, v = (_calibrated(3.0, shared=shared) for _ in range(3))
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    outputs = [q(x), k(x), v(x)]
    assert computed == [q]
    assert outputs[1] is outputs[0] and outputs[2] is outputs[0]
    assert_bitexact(outputs[0], rq.fp8_fake_quant(x, torch.tensor(3.0)))


@pytest.mark.parametrize(
    "what, second",
    [
        ("another amax", lambda shared: _calibrated(2.0, shared=shared)),
        ("another format", lambda shared: _calibrated(3.0, "nvfp4", shared=shared)),
        ("no shared cache", lambda shared: _calibrated(3.0)),
    ],
)
def test_other_settings_compute_their_own_result(monkeypatch, what, second):
    shared = SharedInputResult()
    first, other = _calibrated(3.0, shared=shared), second(shared)
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    first(x)
    out = other(x)
    assert computed == [first, other], what
    assert_bitexact(out, other._fake_quant(x, other._amax_value_now()), what)


def test_a_changed_input_or_result_or_amax_is_computed_again(monkeypatch):
    shared = SharedInputResult()
    a, b = _calibrated(3.0, shared=shared), _calibrated(3.0, shared=shared)
    computed = _counting(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    a(x)
    x.mul_(2)  # in place: the input's version moves
    assert_bitexact(b(x), rq.fp8_fake_quant(x, torch.tensor(3.0)), "after x changed")
    result = a(x)  # b's result, shared
    result.add_(1)  # someone wrote into the shared result
    assert_bitexact(b(x), rq.fp8_fake_quant(x, torch.tensor(3.0)), "after the result changed")
    b._buffers["_amax"].fill_(2.0)  # amax changed in place: b's settings differ now
    assert_bitexact(b(x), rq.fp8_fake_quant(x, torch.tensor(2.0)), "after the amax changed")
    assert computed == [a, b, b, b], "a, then b after each change; a's second call shared b's result"


def test_weights_are_not_kept_and_a_freed_input_frees_the_entry():
    shared = SharedInputResult()
    quantizer = _calibrated(3.0, shared=shared)
    quantizer(torch.nn.Parameter(torch.randn(8, 64)))
    assert shared._entry is None, "a weight was kept"
    x = torch.randn(4, 64)
    quantizer(x)
    assert shared._entry is not None
    del x
    gc.collect()
    assert shared._entry is None, "the entry outlived its input"


def test_insert_quantizers_gives_a_models_quantizers_one_shared_cache_and_qkv_share_it(monkeypatch):
    model, ids = _quantized_tiny_llama("fp8_default-fp8_kv", 1, backend="reference")
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    assert len({id(q.shared_input_result) for q in quantizers}) == 1
    computed = _counting(monkeypatch)
    with torch.no_grad():
        shared_logits = model(input_ids=ids).logits
        for quantizer in quantizers:
            quantizer.shared_input_result = None
        computed_with_cache = len(computed)
        own_logits = model(input_ids=ids).logits
    # per layer: k_proj and v_proj reuse q_proj's input result, up_proj gate_proj's
    assert len(computed) - computed_with_cache - computed_with_cache == 3 * 2
    assert_bitexact(shared_logits, own_logits, "logits with and without the shared results")


def test_an_inference_graph_is_called_through_inductors_own_call_and_gives_the_same_bits(monkeypatch):
    """Under no_grad, the adopted graph calls inductor's generated call(args) itself (the autograd
    wrappers around it do nothing for such a graph). Compiled afresh (no AOT cache) so that the
    inner compile is seen."""
    own = types.FunctionType(_halved.__code__.replace(co_name="_halved_inference"), globals(), None, _halved.__defaults__)
    per_signature = CompiledPerSignature(own, prepare=functions._marked)
    amax = torch.tensor(3.0)
    with torch.no_grad(), torch._functorch.config.patch(enable_autograd_cache=False):
        x = torch.randn(8, 32, dtype=torch.bfloat16)
        entry = _entry(per_signature, x, amax)
        entry(x, amax)
    assert entry.direct_graphs == 1 and entry._direct[0].inference_code is not None
    _no_dynamo(entry, monkeypatch)
    with torch.no_grad():
        for rows in (3, 64):
            y = torch.randn(rows, 32, dtype=torch.bfloat16)
            assert_bitexact(entry(y, amax), _halved(y, amax), f"{rows} rows through inductor's call")


# ---------------------------------------------------------------------------------------------
# TensorQuantizer's bound call (refquant.compiled.bind_fake_quant)
# ---------------------------------------------------------------------------------------------


def _compiled_quantizer(fmt: str, amax: float | None, flavor: str = "modelopt-cpu") -> TensorQuantizer:
    quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor=flavor)
    if amax is not None:
        quantizer.set_amax(torch.tensor(amax))
    return quantizer


def _expected(quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    amax = quantizer.amax
    if quantizer.config.format == "fp8":
        return rq.fp8_fake_quant(x, amax, flavor=quantizer.flavor)
    return rq.nvfp4_fake_quant(x, amax)


def _public_functions_refuse(monkeypatch):
    for name in ("fp8_fake_quant", "nvfp4_fake_quant"):
        monkeypatch.setattr(rc, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("the public function ran")))


@pytest.mark.parametrize("fmt, amax", [("fp8", 3.0), ("nvfp4", 3.0), ("nvfp4", None), ("fp8", None)])
def test_a_quantizers_later_calls_take_the_bound_call(monkeypatch, fmt, amax):
    quantizer = _compiled_quantizer(fmt, amax)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_bitexact(quantizer(x), _expected(quantizer, x), "first call")
        assert quantizer._bound is not None
        _public_functions_refuse(monkeypatch)
        for shape in ((3, 7, 64), (5, 64), (2, 2, 9, 64)):
            y = torch.randn(*shape, dtype=torch.bfloat16)
            assert_bitexact(quantizer(y), _expected(quantizer, y), f"bound call, {shape}")


@pytest.mark.parametrize(
    "what, change",
    [
        ("the amax changed in place", lambda q: q._buffers["_amax"].fill_(0.5)),
        ("a new amax", lambda q: q.set_amax(torch.tensor(0.25))),
        ("another format", lambda q: q.set_config(QuantizerConfig(format="nvfp4"))),
        ("another flavor", lambda q: setattr(q, "flavor", "modelopt-cuda")),
        ("the constant amax", lambda q: q.set_config(QuantizerConfig(format="fp8", use_constant_amax=True))),
        ("the reference backend", lambda q: setattr(q, "backend", "reference")),
    ],
)
def test_a_quantizer_whose_settings_changed_does_not_use_its_old_bound_call(what, change):
    quantizer = _compiled_quantizer("fp8", 3.0)
    x = torch.randn(4, 64, dtype=torch.bfloat16) * 2
    with torch.no_grad():
        quantizer(x)
        change(quantizer)
        assert_bitexact(quantizer(x), _expected(quantizer, x), what)
        assert_bitexact(quantizer(x), _expected(quantizer, x), f"{what}, again")


def test_a_tensor_the_bound_graph_does_not_take_gets_the_ordinary_call():
    quantizer = _compiled_quantizer("nvfp4", 3.0)
    with torch.no_grad():
        quantizer(torch.randn(4, 64, dtype=torch.bfloat16))
        for x in (torch.randn(4, 64, dtype=torch.float16), torch.randn(64, 4).t().contiguous().t(), torch.randn(1, 64), torch.randn(0, 64)):
            assert_bitexact(quantizer(x), _expected(quantizer, x), f"{x.dtype} {tuple(x.shape)} {x.stride()}")


@pytest.mark.parametrize("flavor", ["modelopt-cpu", "modelopt-cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_a_bound_fp8_call_reads_its_amax_tensor_at_every_call(flavor, dtype):
    """FP8 with an amax tensor binds the graph of fp8_fake_quant itself, which forms the scales from
    the amax at every call: every amax regime (ordinary, below the 2**-24 floor, 448, huge) gives
    the reference's bits, and so does a value written into the same tensor later through `.data`
    (which moves no version counter)."""
    from refquant.compiled import functions

    gen = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(rows, 64, generator=gen) * 40).to(dtype) for rows in (5, 2, 17)]
    amax = torch.tensor(3.0)
    bound = rc.bind_fake_quant("fp8", inputs[0], amax, flavor=flavor)
    assert bound is not None, "nothing was bound"
    assert any(bound._entry is entry for entry in functions._compiled_fp8_fake_quant._compiled.values()), "not fp8_fake_quant's graph"
    for value in (3.0, 1e-30, 448.0, 3.0e38):
        amax.data.copy_(torch.tensor(value))
        for x in inputs:
            out = bound(x)
            assert out is not None, f"{tuple(x.shape)}: the bound graph did not take it"
            assert_bitexact(out, rq.fp8_fake_quant(x, value, flavor=flavor), f"amax {value}, {tuple(x.shape)}")


def test_a_launch_takes_a_permutation_of_a_contiguous_tensor_with_the_last_dim_innermost():
    """What BoundKernelLaunch reads in place besides contiguous tensors (functions._rows_in_memory):
    the layouts whose elements fill one stretch of memory as rows of the last dim."""
    base = torch.empty(2, 8, 4, 32)
    takes = {
        "contiguous": base,
        "K and V without a KV cache": base.transpose(1, 2),
        "the leading dims permuted": base.permute(2, 0, 1, 3),
        "a size-1 dim with any stride": torch.empty(4, 1, 32).as_strided((4, 1, 32), (32, 7, 1)),
    }
    refuses = {
        "the last dim not innermost": base.transpose(2, 3),
        "a slice of each row": base[..., :16],
        "every other row": base[:, ::2],
        "an expanded dim (stride 0)": torch.empty(1, 32).expand(4, 32),
        "overlapping rows": torch.empty(80).as_strided((4, 32), (16, 1)),
    }
    for what, x in takes.items():
        assert functions._rows_in_memory(x), what
    for what, x in refuses.items():
        assert not functions._rows_in_memory(x), what


def test_bind_fake_quant_binds_nothing_it_cannot_call_directly():
    x = torch.randn(4, 64)
    rc.fp8_fake_quant(x, torch.ones(1, 64), flavor="modelopt-cpu")
    assert rc.bind_fake_quant("fp8", x, torch.ones(1, 64)) is None, "a per-channel amax"
    assert rc.bind_fake_quant("fp8", torch.randn(0, 64), 1.0) is None, "an empty x"
    assert rc.bind_fake_quant("int8", x, 1.0) is None, "an unknown format"
    with pytest.raises(ValueError, match="amax"):
        rc.bind_fake_quant("fp8", x, -1.0)


def test_a_quantized_model_with_bound_calls_deep_copies_and_its_quantizers_pickle():
    import copy
    import io

    model, ids = _quantized_tiny_llama("nvfp4_default-fp8_cast_kv", 2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert any(q._bound is not None for q in model.modules() if isinstance(q, TensorQuantizer))
        copied = copy.deepcopy(model)
        shared = {id(q.shared_input_result) for q in copied.modules() if isinstance(q, TensorQuantizer)}
        assert len(shared) == 1 and shared != {id(model.model.layers[0].self_attn.q_proj.input_quantizer.shared_input_result)}
        assert_bitexact(copied(input_ids=ids).logits, logits, "the deep copy")
        quantizer = model.model.layers[0].self_attn.k_proj.weight_quantizer
        buffer = io.BytesIO()
        torch.save(quantizer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        weight = model.model.layers[0].self_attn.k_proj.weight
        assert_bitexact(loaded(weight), quantizer(weight), "a quantizer pickled after its bound call")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_kv_cache"])
@pytest.mark.parametrize("recipe", ["fp8_default-fp8_kv", "nvfp4_default-fp8_cast_kv", "nvfp4_default-fp8_kv"])
def test_a_steady_quantized_forward_makes_no_dynamo_call_and_no_new_binding(monkeypatch, recipe, use_cache, device):
    """The fast path holds for a whole model: after a warm-up forward, every quantizer call is a
    bound call or a shared result (a regression here, such as the weights' Parameter type failing
    the guards, would only show as lost speed). Without a KV cache the attention gets K and V as
    transposed views; on CUDA a kernel launch that refused them would be bound and bound again
    on every call (docs/compiled.md, "Tried and rejected")."""
    model, ids = _quantized_tiny_llama(recipe, 3, device=device)
    entries = lambda: [e for c in functions.compiled_functions() for e in c._compiled.values()]  # noqa: E731
    with torch.no_grad():
        model(input_ids=ids, use_cache=use_cache)
        through_dynamo = sum(e.calls_through_dynamo for e in entries())
        monkeypatch.setattr(TensorQuantizer, "_bind", lambda *a, **k: pytest.fail("a quantizer bound again"))
        _public_functions_refuse(monkeypatch)
        for length in (12, 7):
            model(input_ids=ids[:, :length], use_cache=use_cache)
    assert sum(e.calls_through_dynamo for e in entries()) == through_dynamo
