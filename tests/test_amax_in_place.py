"""One amax, read the same way by both backends: a quantizer's stored amax written in place.

modelopt's own amax setter writes `self._amax.data.copy_(value)`, which moves no version counter
(a tensor's `.data` is an alias with a counter of its own) and keeps the data pointer. Whatever
the write, the next call of a quantizer uses the value now in its buffer, in the reference and
in the compiled backend (whose bound calls hold the buffer itself, never values computed from
it). On the CPU a NaN, infinite or negative value written so raises at the next call as one
stored by set_amax does; on a GPU, where reading it back would be a device sync a call, it is
checked when the buffer's version moves and by the export (docs/contract.md §9).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda

import refquant as rq
from refquant import QuantizerConfig, TensorQuantizer
from refquant.quant.quantizer import SharedInputResult
from refquant.testing import assert_bitexact


def _write_data_copy(q: TensorQuantizer, value: torch.Tensor) -> None:
    q.amax.data.copy_(value)  # modelopt's TensorQuantizer amax setter


def _write_buffer_data_copy(q: TensorQuantizer, value: torch.Tensor) -> None:
    q._amax.data.copy_(value)


def _write_buffer_copy(q: TensorQuantizer, value: torch.Tensor) -> None:
    with torch.no_grad():
        q._amax.copy_(value)


def _write_data_fill(q: TensorQuantizer, value: torch.Tensor) -> None:
    q._amax.data.fill_(float(value))


def _write_data_assignment(q: TensorQuantizer, value: torch.Tensor) -> None:
    q._amax.data = value.clone().to(q._amax.device)


def _write_through_an_old_alias(q: TensorQuantizer, value: torch.Tensor) -> None:
    q._alias.copy_(value)  # an alias taken with .data before the first call


WRITES = {
    "q.amax.data.copy_": _write_data_copy,
    "q._amax.data.copy_": _write_buffer_data_copy,
    "q._amax.copy_": _write_buffer_copy,
    "q._amax.data.fill_": _write_data_fill,
    "q._amax.data = tensor": _write_data_assignment,
    "an alias from .data": _write_through_an_old_alias,
}


def _quantizer(fmt: str, backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TensorQuantizer:
    quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend=backend, flavor="modelopt-cuda" if device == "cuda" else "modelopt-cpu")
    quantizer.set_amax(torch.tensor(3.0, dtype=dtype, device=device))
    quantizer._alias = quantizer._amax.data
    return quantizer


def _reference(fmt: str, x: torch.Tensor, amax: float, flavor: str = "modelopt-cpu") -> torch.Tensor:
    x = x.cpu()
    return rq.fp8_fake_quant(x, amax, flavor=flavor) if fmt == "fp8" else rq.nvfp4_fake_quant(x, amax)


def _calls(quantizer: TensorQuantizer, x: torch.Tensor, times: int = 2) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(times):
            out = quantizer(x)
    return out


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_an_amax_written_in_place_is_used_on_the_next_call(backend, fmt, write):
    quantizer = _quantizer(fmt, backend)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 2
    assert_bitexact(_calls(quantizer, x), _reference(fmt, x, 3.0), "before the write")
    WRITES[write](quantizer, torch.tensor(0.75))
    assert_bitexact(_calls(quantizer, x, 1), _reference(fmt, x, 0.75), f"the call after {write}")
    assert_bitexact(_calls(quantizer, x, 1), _reference(fmt, x, 0.75), f"the second call after {write}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("write", ["q.amax.data.copy_", "q._amax.data.fill_", "an alias from .data"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_a_bad_amax_written_in_place_raises_on_the_next_call_as_a_stored_one_does(backend, fmt, write, bad):
    stored = _quantizer(fmt, backend)
    stored.set_amax(torch.tensor(bad))
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="amax") as through_set_amax:
        _calls(stored, x, 1)

    quantizer = _quantizer(fmt, backend)
    quantizer.name = "layers.0.q_proj.input_quantizer"
    _calls(quantizer, x)
    WRITES[write](quantizer, torch.tensor(bad))
    with pytest.raises(ValueError, match="amax") as raised:
        _calls(quantizer, x, 1)
    message = str(raised.value)
    assert "layers.0.q_proj.input_quantizer" in message, message
    assert str(bad) in message and str(bad) in str(through_set_amax.value), message


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_quantizers_sharing_an_input_see_each_others_amax_written_in_place(backend):
    """SharedInputResult hands one quantizer's result to the next one given the same tensor while
    their amaxes are equal: after one's amax is written through .data they are not."""
    shared = SharedInputResult()
    first, second = _quantizer("fp8", backend), _quantizer("fp8", backend)
    first.shared_input_result = second.shared_input_result = shared
    x = torch.randn(4, 64).to(torch.bfloat16) * 2
    with torch.no_grad():
        assert_bitexact(second(x), first(x), "equal amaxes share the result")
        second.amax.data.copy_(torch.tensor(0.5))
        assert_bitexact(first(x), _reference("fp8", x, 3.0), "the first quantizer")
        assert_bitexact(second(x), _reference("fp8", x, 0.5), "the second, after its amax was written")


def test_a_per_channel_amax_written_in_place_is_used_and_checked():
    quantizer = TensorQuantizer(QuantizerConfig(format="fp8", axis=0))
    quantizer.set_amax(torch.full((4, 1), 3.0))
    x = torch.randn(4, 64) * 2
    _calls(quantizer, x)
    quantizer.amax.data[1] = 0.5
    expected = rq.fp8_fake_quant(x, torch.tensor([[3.0], [0.5], [3.0], [3.0]]))
    assert_bitexact(_calls(quantizer, x, 1), expected, "after one channel was written")
    quantizer.amax.data[2] = float("nan")
    with pytest.raises(ValueError, match="nan"):
        _calls(quantizer, x, 1)


@pytest.mark.parametrize("fake_quant", [rq.fp8_fake_quant, rq.nvfp4_fake_quant], ids=["fp8", "nvfp4"])
def test_a_cpu_amax_tensor_written_through_data_is_checked_again_by_the_functions(fake_quant):
    x = torch.randn(4, 64)
    amax = torch.tensor(3.0)
    fake_quant(x, amax)
    amax.data.copy_(torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="nan"):
        fake_quant(x, amax)


# --- CUDA: the bound launches of our Triton kernels ----------------------------------------------


@cuda
@pytest.mark.parametrize("write", ["q.amax.data.copy_", "q._amax.copy_", "an alias from .data"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_on_cuda_a_bound_launch_uses_an_amax_written_in_place(fmt, write):
    """On a GPU a call does not read the amax back (a device sync): the bound launch reads the
    buffer itself, so any write is used by the next call with the reference's bits. A NaN written
    so is checked where the buffer's version moves (a plain copy_: the next call raises) and by
    the export; through `.data` the next call computes with it (NaN outputs) without a sync."""
    from refquant.compiled import functions

    quantizer = _quantizer(fmt, "compiled", "cuda", torch.bfloat16)
    x = torch.randn(4, 64, device="cuda").to(torch.bfloat16) * 2
    assert_bitexact(_calls(quantizer, x).cpu(), _reference(fmt, x, 3.0, "modelopt-cuda"), "before the write")
    assert isinstance(quantizer._bound[0], functions.BoundKernelLaunch)
    WRITES[write](quantizer, torch.tensor(0.75))
    assert_bitexact(_calls(quantizer, x, 1).cpu(), _reference(fmt, x, 0.75, "modelopt-cuda"), f"after {write}")
    assert isinstance(quantizer._bound[0], functions.BoundKernelLaunch)
    WRITES[write](quantizer, torch.tensor(float("nan")))
    if write == "q._amax.copy_":
        with pytest.raises(ValueError, match="nan"):
            _calls(quantizer, x, 1)
    else:  # the reference's arithmetic under that amax (its functions refuse a NaN amax up front)
        assert_bitexact(_calls(quantizer, x, 1).cpu(), _arithmetic_under(fmt, x.cpu(), torch.tensor(float("nan"))),
                        f"{fmt}, NaN written through {write}")


def _arithmetic_under(fmt: str, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """What fake quant computes under `amax` without the functions' check of it: FP8 gives NaN
    everywhere for a NaN amax, NVFP4 falls back to its floor global scale."""
    from refquant.numerics import fp8, nvfp4

    if fmt == "fp8":
        return fp8.fp8_fake_quant_with_scales(x, *fp8.fp8_fake_quant_scales(amax, "modelopt-cuda"))
    return nvfp4.nvfp4_fake_quant_blocks(x, amax.float())


def test_the_arithmetic_under_a_nan_amax_is_what_the_gpu_path_is_held_to():
    x = torch.randn(4, 64).to(torch.bfloat16) * 2
    assert bool(_arithmetic_under("fp8", x, torch.tensor(float("nan"))).isnan().all())
    nvfp4_out = _arithmetic_under("nvfp4", x, torch.tensor(float("nan")))
    assert not bool(nvfp4_out.isnan().any())
    assert_bitexact(nvfp4_out, _arithmetic_under("nvfp4", x, torch.tensor(0.0)), "NaN and 0 take the floor global scale alike")


def test_the_export_refuses_an_amax_written_as_nan_in_place():
    from refquant.hf.export import plan_export
    from refquant.hf.models import build_builtin_model

    model = build_builtin_model()
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), [torch.randint(3, 259, (1, 16))], progress=False)
    quantizer = model.model.layers[0].self_attn.q_proj.input_quantizer
    quantizer.amax.data.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.input_quantizer holds the amax \[nan\]"):
        plan_export(model)
