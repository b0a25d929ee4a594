"""Gradients through fake quantization: modelopt's straight-through estimator, bit for bit.

modelopt's fake-quant autograd Functions (ScaledE4M3Function for FP8, DynamicBlockQuantization-
Function for NVFP4) run with `pass_through_bwd=True`, the default of every quantizer config:
their backward returns the upstream gradient itself for the input, unchanged and not clipped,
and None for the amax (docs/modelopt_behaviour.md §1.9). So d(fake_quant(x))/dx is the identity
and a QAT step moves a quantized linear's weights by the gradient of the linear at its
fake-quantized weight. Every public fake quant of both backends and the quantizer module are
held to that here; modelopt itself (where installed) to the same bits on the CPU for FP8.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda
from torch import nn

import refquant as rq
import refquant.compiled as rc
from refquant import QuantizerConfig, TensorQuantizer
from refquant.hf.ptq import insert_quantizers
from refquant.testing import assert_bitexact

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
AMAX = 2.0


def _inputs(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """(4, 32): inside [-amax, amax], at it, far outside it (where a clipped STE would zero the
    gradient), zeros of both signs and values that round to zero."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=gen) * 3
    x[0, :6] = torch.tensor([AMAX, -AMAX, 40.0, -300.0, 0.0, -0.0])
    x[1, :3] = torch.tensor([1e-4, -1e-4, 2.5])
    return x.to(dtype).to(device)


def _upstream(kind: str, like: torch.Tensor) -> torch.Tensor:
    """The gradients the issue names (1 and 0.01 everywhere) and a random one."""
    if kind == "random":
        return torch.randn(like.shape, generator=torch.Generator().manual_seed(1)).to(like.dtype).to(like.device)
    return torch.full_like(like, {"ones": 1.0, "hundredths": 0.01}[kind])


def _gradient(fake_quant, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, d output / d x applied to upstream) of fake_quant on a leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fake_quant(leaf)
    out.backward(upstream)
    return out.detach(), leaf.grad


REFERENCE_FAKE_QUANTS = {
    "fp8, amax given": lambda x: rq.fp8_fake_quant(x, AMAX),
    "fp8, flavor modelopt-cuda": lambda x: rq.fp8_fake_quant(x, torch.tensor(AMAX), flavor="modelopt-cuda"),
    "fp8, per-channel amax": lambda x: rq.fp8_fake_quant(x, torch.tensor([[2.0], [1.0], [0.5], [4.0]])),
    "fp8, amax from the data": lambda x: rq.fp8_fake_quant(x),
    "fp8, per-channel amax from the data": lambda x: rq.fp8_fake_quant(x, axis=0),
    "nvfp4, amax given": lambda x: rq.nvfp4_fake_quant(x, AMAX),
    "nvfp4, amax from the data": lambda x: rq.nvfp4_fake_quant(x),
    "nvfp4, last dim not a multiple of 16": lambda x: rq.nvfp4_fake_quant(x[:, :20], AMAX),
}


@pytest.mark.parametrize("upstream_kind", ["ones", "hundredths", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(REFERENCE_FAKE_QUANTS))
def test_fake_quant_passes_the_upstream_gradient_through_unchanged(name, dtype, upstream_kind):
    fake_quant = REFERENCE_FAKE_QUANTS[name]
    x = _inputs(dtype)
    upstream = _upstream(upstream_kind, fake_quant(x))
    _, grad = _gradient(fake_quant, x, upstream)
    expected = torch.zeros_like(x)
    expected[:, : upstream.shape[-1]] = upstream  # the cropped columns get no gradient
    assert_bitexact(grad, expected, f"{name}, upstream {upstream_kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(REFERENCE_FAKE_QUANTS))
def test_fake_quant_gives_the_same_bits_whether_or_not_it_records_a_gradient(name, dtype):
    fake_quant = REFERENCE_FAKE_QUANTS[name]
    x = _inputs(dtype)
    with torch.no_grad():
        plain = fake_quant(x)
    recorded, _ = _gradient(fake_quant, x, torch.ones_like(plain))
    assert_bitexact(recorded, plain, name)


@pytest.mark.parametrize("fake_quant", [rq.fp8_fake_quant, rq.nvfp4_fake_quant], ids=["fp8", "nvfp4"])
def test_an_amax_that_requires_grad_gets_no_gradient_as_in_modelopt(fake_quant):
    """modelopt's backward returns None for the amax: a learnable amax is not trained by it."""
    x = _inputs(torch.float32).requires_grad_(True)
    amax = torch.tensor(AMAX, requires_grad=True)
    fake_quant(x, amax).sum().backward()
    assert amax.grad is None
    assert_bitexact(x.grad, torch.ones_like(x), "the input's gradient")


def test_an_amax_that_requires_grad_alone_still_gets_no_gradient():
    """Only the amax requires grad: the output is attached to it, as modelopt's Function output is,
    and backward leaves it without a gradient."""
    amax = torch.tensor(AMAX, requires_grad=True)
    out = rq.fp8_fake_quant(_inputs(torch.float32), amax)
    assert out.requires_grad
    out.sum().backward()
    assert amax.grad is None


# --- the quantizer module, both backends -------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_quantizers_gradient_is_the_upstream_gradient_after_its_calls_were_bound(backend, fmt):
    """A calibrated quantizer that already made (and, compiled, bound) calls without grad: a call
    that records a gradient gives the same bits and the straight-through gradient."""
    quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend=backend)
    quantizer.set_amax(torch.tensor(AMAX))
    x = _inputs(torch.bfloat16)
    with torch.no_grad():
        plain = quantizer(x)
        quantizer(x)
    upstream = _upstream("random", plain)
    out, grad = _gradient(quantizer, x, upstream)
    assert_bitexact(out, plain, "the output with a gradient recorded")
    assert_bitexact(grad, upstream, "the input's gradient")
    with torch.no_grad():
        assert_bitexact(quantizer(x), plain, "a call without grad afterwards")


@pytest.mark.parametrize("fn", ["fp8_fake_quant", "nvfp4_fake_quant"])
def test_compiled_fake_quant_passes_the_gradient_through_on_every_call(fn):
    """The compiled function with x requiring grad, twice: its first call compiles the graph with
    the backward, the second runs that graph again."""
    x = _inputs(torch.bfloat16)
    for call in ("first", "second"):
        upstream = _upstream("random", x)
        out, grad = _gradient(lambda t: getattr(rc, fn)(t, AMAX), x, upstream)
        assert_bitexact(out, getattr(rq, fn)(x, AMAX), f"{call} call's output")
        assert_bitexact(grad, upstream, f"{call} call's gradient")


def test_fake_quant_inside_a_users_torch_compile_passes_the_gradient_through():
    def model(x):
        return rq.fp8_fake_quant(x, AMAX) * 3 + rq.nvfp4_fake_quant(x, AMAX)

    x = _inputs(torch.float32)
    upstream = _upstream("random", x)
    out, grad = _gradient(torch.compile(model, fullgraph=True), x, upstream)
    assert_bitexact(out, model(x), "the output")
    expected = (upstream * 3 + upstream).detach()  # the gradient of the sum, as autograd forms it
    assert_bitexact(grad, expected, "the gradient")


# --- a QAT step through a quantized linear -----------------------------------------------------


def _quantized_linear(fmt: str, backend: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """refquant's QuantLinear (insert_quantizers on one nn.Linear) with its input and weight
    quantizers on, per-tensor amaxes 2.0 and max|W|."""
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype))
    with torch.no_grad():
        model[0].weight.copy_(weight)
        model[0].bias.copy_(bias)
    insert_quantizers(model, backend=backend)
    layer = model[0]
    for quantizer, amax in ((layer.input_quantizer, torch.tensor(AMAX)), (layer.weight_quantizer, weight.abs().amax())):
        quantizer.set_config(QuantizerConfig(format=fmt))
        quantizer.set_amax(amax)
    return model


def _qat_step(model: nn.Module, layer: nn.Linear, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step on the mean squared error: the gradients and the weights after it."""
    x = x.detach().clone().requires_grad_(True)
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()
    grads = {"weight gradient": layer.weight.grad.clone(), "bias gradient": layer.bias.grad.clone(), "input gradient": x.grad}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return {**grads, "weight after the step": layer.weight.detach().clone(), "bias after the step": layer.bias.detach().clone()}


def _linear_data(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(8, 32, generator=gen) * 0.2).to(dtype)
    bias = (torch.randn(8, generator=gen) * 0.1).to(dtype)
    x = (torch.randn(6, 32, generator=gen) * 1.5).to(dtype)  # some |x| above the input amax 2.0
    target = torch.randn(6, 8, generator=gen).to(dtype)
    return weight, bias, x, target


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_a_qat_step_moves_the_weights_by_the_linears_gradient_at_the_quantized_weight(fmt, backend):
    """The straight-through definition, without modelopt: the gradients are those of a plain linear
    applied to the fake-quantized input with the fake-quantized weight (the quantizers pass them
    through), so the weights move and by exactly that much."""
    weight, bias, x, target = _linear_data(torch.float32)
    model = _quantized_linear(fmt, backend, weight, bias)
    layer = model[0]
    with torch.no_grad():
        quantized_x, quantized_w = layer.input_quantizer(x), layer.weight_quantizer(layer.weight)
    got = _qat_step(model, layer, x, target)

    plain = nn.Linear(32, 8)
    with torch.no_grad():
        plain.weight.copy_(quantized_w)
        plain.bias.copy_(bias)
    x_leaf = quantized_x.clone().requires_grad_(True)
    ((plain(x_leaf) - target) ** 2).mean().backward()
    assert got["weight gradient"].abs().sum() > 0, "the weights got no gradient"
    assert_bitexact(got["weight gradient"], plain.weight.grad, "weight gradient")
    assert_bitexact(got["bias gradient"], plain.bias.grad, "bias gradient")
    assert_bitexact(got["input gradient"], x_leaf.grad, "input gradient")
    assert_bitexact(got["weight after the step"], weight - 0.5 * plain.weight.grad, "weight after the step")


# --- modelopt itself, on the CPU ----------------------------------------------------------------


def _modelopt():
    pytest.importorskip("modelopt.torch.quantization")
    import modelopt.torch.quantization.nn as modelopt_nn
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    return modelopt_nn, QuantizerAttributeConfig


@pytest.mark.parametrize("upstream_kind", ["ones", "hundredths", "random"])
@pytest.mark.parametrize(
    "backend, dtype",
    [("reference", dtype) for dtype in DTYPES] + [("compiled", torch.bfloat16)],  # compiled: one graph
    ids=[f"reference-{name}" for name in DTYPE_IDS] + ["compiled-bf16"],
)
def test_fp8_quantizer_output_and_gradient_equal_modelopts_on_the_cpu(backend, dtype, upstream_kind):
    modelopt_nn, QuantizerAttributeConfig = _modelopt()
    theirs = modelopt_nn.TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3)))
    theirs.amax = torch.tensor(AMAX)
    ours = TensorQuantizer(QuantizerConfig(format="fp8"), backend=backend)
    ours.set_amax(torch.tensor(AMAX))
    x = _inputs(dtype)
    upstream = _upstream(upstream_kind, x)
    their_out, their_grad = _gradient(theirs, x, upstream)
    our_out, our_grad = _gradient(ours, x, upstream)
    assert_bitexact(our_out, their_out, "output")
    assert_bitexact(our_grad, their_grad, "input gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_fp8_qat_step_equals_modelopts_quant_linear_bit_for_bit(dtype):
    """The same FP8 QuantLinear (input and weight quantizers, per-tensor amaxes) in refquant and in
    modelopt: the same gradients and the same weights after an SGD step, bit for bit."""
    modelopt_nn, QuantizerAttributeConfig = _modelopt()
    weight, bias, x, target = _linear_data(dtype)

    theirs = modelopt_nn.QuantLinear(32, 8).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(weight)
        theirs.bias.copy_(bias)
    theirs.input_quantizer.set_from_attribute_config(QuantizerAttributeConfig(num_bits=(4, 3)))
    theirs.weight_quantizer.set_from_attribute_config(QuantizerAttributeConfig(num_bits=(4, 3), axis=None))
    theirs.input_quantizer.amax = torch.tensor(AMAX)
    theirs.weight_quantizer.amax = weight.abs().amax()
    their_step = _qat_step(theirs, theirs, x, target)

    ours = _quantized_linear("fp8", "reference", weight, bias)
    our_step = _qat_step(ours, ours[0], x, target)
    assert their_step["weight gradient"].abs().sum() > 0
    for what, value in their_step.items():
        assert_bitexact(our_step[what], value, what)


# --- CUDA: the Triton paths ----------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_on_cuda_a_compiled_quantizer_with_a_bound_launch_passes_the_gradient_through(fmt):
    """bf16 on CUDA binds a launch of our Triton kernel; a call that records a gradient takes the
    autograd path (NVFP4: the compiled reference with the Triton block step) and gives the CPU
    reference's bits and the upstream gradient."""
    from refquant.compiled import functions

    quantizer = TensorQuantizer(QuantizerConfig(format=fmt), backend="compiled", flavor="modelopt-cuda")
    quantizer.set_amax(torch.tensor(AMAX, device="cuda"))
    x = _inputs(torch.bfloat16, "cuda")
    with torch.no_grad():
        quantizer(x)
    assert isinstance(quantizer._bound[0], functions.BoundKernelLaunch)
    upstream = _upstream("random", x)
    for call in ("first", "second"):
        out, grad = _gradient(quantizer, x, upstream)
        expected = rq.fp8_fake_quant(x.cpu(), AMAX, flavor="modelopt-cuda") if fmt == "fp8" else rq.nvfp4_fake_quant(x.cpu(), AMAX)
        assert_bitexact(out.cpu(), expected, f"{call} call's output")
        assert_bitexact(grad.cpu(), upstream.cpu(), f"{call} call's gradient")


@cuda
@pytest.mark.parametrize("fn", ["fp8_fake_quant", "nvfp4_fake_quant"])
def test_on_cuda_compiled_fake_quant_passes_the_gradient_through(fn):
    x = _inputs(torch.bfloat16, "cuda")
    upstream = _upstream("random", x)
    for call in ("first", "second"):
        out, grad = _gradient(lambda t: getattr(rc, fn)(t, AMAX), x, upstream)
        assert_bitexact(out.cpu(), getattr(rq, fn)(x.cpu(), AMAX), f"{call} call's output")
        assert_bitexact(grad.cpu(), upstream.cpu(), f"{call} call's gradient")
