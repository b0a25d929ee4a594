"""The fused experts' routing in Triton (refquant.compiled.routing_triton) against the torch steps
of refquant.hf.experts_loop._Routing: the same bounds, each row's token and routing weight, and
the same row table, for routings of every shape the loop meets (one expert a token or many, a
token naming an expert twice, experts left without rows, ids outside the experts, chunks and
scans of many steps, strided operands, integer ids of any width, weights of any float dtype).
On CUDA as the loop runs it; on the CPU through Triton's interpreter where Triton is installed
(tests/triton_interpreter.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from refquant.hf import experts_loop
from refquant.quant.backends import routing_kernel

from conftest import cuda
from triton_interpreter import mismatches_in_interpreter

# (tokens, top_k, experts, lowest id, highest id + 1, id dtype, weight dtype, strided, seed)
CASES = [
    (37, 2, 9, 0, 9, torch.int64, torch.float32, False, 1),  # every expert, a few chunks
    (1000, 8, 64, 0, 64, torch.int64, torch.bfloat16, False, 2),  # the MoE shape's routing, scans of many steps
    (5, 1, 3, 0, 3, torch.int32, torch.float16, False, 3),  # one expert a token
    (50, 6, 256, 0, 256, torch.int64, torch.bfloat16, True, 4),  # top_k not a power of two, many experts, strided
    (300, 4, 60, 0, 7, torch.int16, torch.float32, True, 5),  # most experts without rows
    (64, 3, 4, 0, 4, torch.uint8, torch.bfloat16, False, 6),  # tokens naming an expert twice or more
    (20, 4, 6, -1, 7, torch.int64, torch.float32, False, 7),  # ids outside the experts: not handled
    (1, 1, 1, 0, 1, torch.int64, torch.float32, False, 8),  # one token, one expert
    (64, 8, 1024, 0, 1024, torch.int64, torch.bfloat16, False, 9),  # the most experts the kernels take
]


def routing_inputs(case, device: str):
    tokens, top_k, experts, low, high, id_dtype, weight_dtype, strided, seed = case
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(low, high, (tokens, top_k), generator=generator).to(id_dtype)
    weights = torch.rand(tokens, top_k, generator=generator).to(weight_dtype)
    if strided:  # columns of wider tensors: strides other than (top_k, 1)
        index = torch.cat([index, index], dim=1)[:, ::2]
        weights = torch.cat([weights, weights], dim=1)[:, 1::2]
    return index.to(device), weights.to(device), experts


def mismatches(case, device: str) -> list[str]:
    """What the kernel's routing gives otherwise than the torch steps' for `case` on `device`."""
    index, weights, experts = routing_inputs(case, device)
    kernel = importlib.import_module("refquant.compiled.routing_triton")
    expected = experts_loop._Routing(index, weights, experts)
    got = experts_loop._Routing(index, weights, experts, kernel)
    handled = expected.read()
    wrong = []
    if got.read() != handled or got.starts != expected.starts:
        wrong.append(f"bounds {got.starts} against {expected.starts}")
    if handled:
        for name in ("token", "weight"):
            if not torch.equal(getattr(got, name), getattr(expected, name)):
                wrong.append(name)
        if got.weight.dtype != weights.dtype:
            wrong.append("the weights' dtype")
        if not torch.equal(got.row_table().long(), expected.row_table()):
            wrong.append("row table")
        if not torch.equal(got.sum_positions(), expected.sum_positions()):
            wrong.append("sum positions")
    return [f"case {case[:5]}: {what}" for what in wrong]


@cuda
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}x{case[1]}_of_{case[2]}")
def test_the_kernels_route_as_the_torch_steps_on_cuda(case):
    pytest.importorskip("triton")
    assert mismatches(case, "cuda") == []


def all_mismatches(device: str) -> list[str]:
    return [wrong for case in CASES for wrong in mismatches(case, device)]


def test_the_kernels_route_as_the_torch_steps_in_tritons_interpreter():
    assert mismatches_in_interpreter("test_routing_kernel", "all_mismatches") == []


def test_the_kernels_route_only_for_the_compiled_backend_on_cuda():
    ids = torch.zeros(2, 2, dtype=torch.int64)
    assert routing_kernel("compiled", ids, 8) is None and routing_kernel("reference", ids, 8) is None
    if torch.cuda.is_available():
        assert routing_kernel("reference", ids.cuda(), 8) is None
        if importlib.util.find_spec("triton") is not None:
            kernel = importlib.import_module("refquant.compiled.routing_triton")
            assert routing_kernel("compiled", ids.cuda(), kernel.MAX_EXPERTS) is kernel
            assert routing_kernel("compiled", ids.cuda(), kernel.MAX_EXPERTS + 1) is None  # more: the torch steps


@cuda
def test_the_cuda_kernels_refuse_weights_of_another_shape():
    pytest.importorskip("triton")
    from refquant.compiled import routing_triton

    with pytest.raises(ValueError, match="weights of shape"):
        routing_triton.route(torch.zeros(4, 2, dtype=torch.int64, device="cuda"), torch.ones(4, 3, device="cuda"), 3)
