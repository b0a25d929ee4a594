"""NVFP4 fake quant against modelopt's Triton kernel on data where ties are common.

nvfp4_fake_kernel_ties.pt was made on an H200 from modelopt 0.47's own kernel
(scripts/make_kernel_vectors.py): bf16 / fp16 weights of the built-in seeded model under four
global amax, all 65,536 bf16 patterns (in order, and shuffled) under nine, and fp32 elements
within 3 ulp of S * p for every E2M1 decision point p. Every element must match, on CPU and CUDA,
eager and compiled: 0 differences.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda, vector_cases

import refquant as rq
import refquant.compiled as rc
from refquant.numerics.formats import E2M1_DECISION_POINTS
from refquant.numerics.nvfp4 import (
    e2m1_round_magnitude,
    global_scale_from_amax,
    nan_ignoring_block_max,
    nvfp4_fake_block_scale,
    to_blocks,
)
from refquant.testing import assert_bitexact, bits_of

FILE = "nvfp4_fake_kernel_ties.pt"
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
# A given amax of inf is bad input to refquant (a clear ValueError); the kernel's bits for that
# case are kept in the file, and the same inf global amax computed from the data is compared.
REJECTED = {"bf16_finite_and_inf_patterns_amax_inf"}


def _cases(group: str | None = None) -> list:
    return [
        pytest.param(case, id=case["name"])
        for case in vector_cases(FILE)
        if case["name"] not in REJECTED and (group is None or case["group"] == group)
    ]


def _amax(case: dict, device: str):
    return None if case["global_amax"] is None else case["global_amax"].to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases())
def test_reference_matches_the_kernel(case, device):
    y = rq.nvfp4_fake_quant(case["x"].to(device), _amax(case, device))
    assert_bitexact(y.cpu(), case["y"], case["name"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _cases())
def test_compiled_matches_the_kernel(case, device):
    y = rc.nvfp4_fake_quant(case["x"].to(device), _amax(case, device))
    assert_bitexact(y.cpu(), case["y"], case["name"])


def test_file_covers_each_group_and_dtype():
    cases = vector_cases(FILE)
    assert {c["group"] for c in cases} == {"weights", "bf16_patterns", "fp32_near_ties"}
    assert {c["x"].dtype for c in cases} == {torch.bfloat16, torch.float16, torch.float32}
    patterns = next(c for c in cases if c["name"] == "bf16_patterns_ordered_amax_1.0")["x"]
    assert torch.equal(patterns.reshape(-1).view(torch.int16).sort().values,
                       torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16))


def _block_scale_and_magnitude(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's block scale S (per block) and |x| in blocks, from the reference's own steps."""
    magnitude = to_blocks(case["x"].float()).abs()
    global_amax = case["x"].abs().amax().float() if case["global_amax"] is None else case["global_amax"]
    global_scale = global_scale_from_amax(global_amax, "modelopt-cuda")
    return nvfp4_fake_block_scale(nan_ignoring_block_max(magnitude), global_scale), magnitude


def test_near_tie_inputs_sit_on_decision_points():
    """The fp32 group is what it says: most quotients |x| / S within 4 ulp of a decision point."""
    case = next(c for c in vector_cases(FILE) if c["name"] == "fp32_near_ties_amax_448.0")
    scale, magnitude = _block_scale_and_magnitude(case)
    quotient = (magnitude.double() / scale.double())[..., 1:]
    points = torch.tensor(E2M1_DECISION_POINTS, dtype=torch.float64)
    near = ((quotient.unsqueeze(-1) - points).abs() <= 4 * 2.0**-23 * points).any(-1)
    assert near.double().mean() > 0.9


@pytest.mark.parametrize("name", ["fp32_near_ties_amax_1.0", "q_proj0_bfloat16_amax_0.5max", "k_proj3_float16_amax_computed"])
def test_the_earlier_ieee_reciprocal_form_misses_these_vectors(name):
    """|x| * rcp(S) (refquant's element step before the kernel's division was reproduced) differs
    from the kernel on these cases (872, 66 and 3 elements; 1,560 over the file): the vectors tell
    the two apart."""
    case = next(c for c in vector_cases(FILE) if c["name"] == name)
    scale, magnitude = _block_scale_and_magnitude(case)
    blocks = to_blocks(case["x"].float())
    p = e2m1_round_magnitude(magnitude * (1.0 / scale)) * scale
    earlier = torch.where(blocks >= 0, p, 0.0 - p).to(case["x"].dtype).flatten(-2)
    assert (bits_of(earlier) != bits_of(case["y"].reshape(earlier.shape))).any()


def test_given_inf_amax_is_rejected_with_a_clear_error():
    case = next(c for c in vector_cases(FILE) if c["name"] in REJECTED)
    with pytest.raises(ValueError, match="amax"):
        rq.nvfp4_fake_quant(case["x"], case["global_amax"])
