"""Exhaustive sweeps: every one of the 65,536 bf16 bit patterns through FP8 and NVFP4.

FP8 fake quant at several amax values and both flavors: equal to modelopt's vectors where the set
has the case, and structurally right everywhere (NaN -> NaN, signed zeros kept, saturation at
+-fl(448 * rcp(s)), monotone, outputs on the E4M3 grid times the inverse scale). An independent
E4M3 rounding (enumerate the 256 codes, pick the nearest, ties to the even code) checks torch's
cast-based path, so these tests do not just compare refquant with itself.

NVFP4: every finite bf16 value in its own block (nvfp4_fake_sweep.pt) through real quant, fake
quant, and an independent E2M1 rounding. What holds there: fake quant == real dequantize, bit for
bit, for all 2 x 65,280 blocks of the sweep (and both equal modelopt's CPU stand-in and its Triton
kernel): with these block scales the kernel's division |x| * R(S) (R the GPU's reciprocal) and the
IEEE x / S never straddle an E2M1 decision point, and no block scale underflows (the two places
where fake and real NVFP4 part, docs/numerics.md).
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from conftest import every_16_bit_pattern, find_case, vector_cases

import refquant as rq
from refquant.numerics.formats import E2M1_MAGNITUDES, E4M3_MAX
from refquant.numerics.fp8 import saturating_e4m3
from refquant.numerics.nvfp4 import e2m1_magnitude_index
from refquant.testing import assert_bitexact, bits_of

FP32_1E_3 = 0.0010000000474974513  # fp32(1e-3), as the vectors store it
# The six amax values of fp8_fake_exhaustive.pt, and more: the 2**-24 floor itself, a value just
# above it, non-power-of-two values whose two scale rules differ, and large ones.
AMAX_VALUES = (0.0, 2.0**-24, 2.0**-20, 9.5367431640625e-07, FP32_1E_3, 0.7, 1.0, 3.140625, 448.0, 12345.678, 3.0e30)
FLAVORS = ("modelopt-cpu", "modelopt-cuda")


# --- an independent E4M3 --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def e4m3_positive_values() -> torch.Tensor:
    """float64 value of codes 0x00..0x7E from the bit layout (1-4-3, bias 7), not from a cast."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 0b111
        if exponent == 0:
            values.append(mantissa / 8 * 2.0**-6)  # subnormal
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


def oracle_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 v rounded to E4M3: nearest value, ties to the even code, |v| >= 448 -> 448, NaN -> NaN."""
    grid = e4m3_positive_values()
    magnitude = v.double().abs().clamp(max=E4M3_MAX)
    upper = torch.searchsorted(grid, magnitude.nan_to_num(0.0)).clamp(max=len(grid) - 1)
    lower = (upper - 1).clamp(min=0)
    below, above = magnitude - grid[lower], grid[upper] - magnitude
    take_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    code = torch.where(take_upper, upper, lower)
    rounded = torch.copysign(grid[code], v.double()).float()
    return torch.where(torch.isnan(v), v, rounded)


def spec_scales(amax: float, flavor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/modelopt_behaviour.md §1.3 / §1.4 written out: (s, rcp(s)) in fp32."""
    a = torch.tensor(amax, dtype=torch.float32)
    a = torch.where(a <= 2.0**-24, torch.ones_like(a), a)
    if flavor == "modelopt-cpu":
        s = torch.reciprocal(a) * torch.tensor(448.0)
    else:
        s = torch.tensor(448.0) / a
    return s, torch.reciprocal(s)


def test_oracle_e4m3_grid_is_the_float8_e4m3fn_grid():
    decoded = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(decoded, e4m3_positive_values())


def test_e4m3_cast_rounds_every_midpoint_to_even_and_neighbours_to_nearest():
    """At each midpoint of two neighbouring E4M3 values, and one fp32 ulp to each side."""
    grid = e4m3_positive_values().float()
    midpoints = (grid[:-1] + grid[1:]) / 2  # exact in fp32
    probes = torch.cat(
        [midpoints, torch.nextafter(midpoints, grid[1:]), torch.nextafter(midpoints, grid[:-1]),
         torch.tensor([448.0, 464.0, 464.0001, 1e30, float("inf")])]
    )
    probes = torch.cat([probes, -probes, torch.tensor([0.0, -0.0, float("nan")])])
    assert_bitexact(saturating_e4m3(probes).float(), oracle_e4m3(probes), "E4M3 rounding of midpoints")
    ties = saturating_e4m3(midpoints).view(torch.uint8)
    assert bool((ties % 2 == 0).all()), "a tie must go to the even code"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_e4m3_cast_equals_independent_rounding_on_every_16bit_pattern(dtype):
    v = every_16_bit_pattern(dtype).float()
    assert_bitexact(saturating_e4m3(v).float(), oracle_e4m3(v), f"E4M3 of every {dtype} pattern")


# --- FP8 fake quant over all bf16 patterns -----------------------------------------------------------


def _vector_y(amax: float, flavor: str) -> torch.Tensor | None:
    """modelopt's output for this (bf16, amax, flavor), if the set has it."""
    names = {case["name"]: case for case in vector_cases("fp8_fake_exhaustive.pt")}
    match = [c for c in names.values() if c["x"].dtype == torch.bfloat16 and float(c["amax"]) == amax]
    if not match:
        return None
    case = match[0]
    if flavor == "modelopt-cuda":
        # fp8_fake_cuda.pt lists only the cases whose CUDA bits differ; the rest equal the CPU y.
        for cuda_case in vector_cases("fp8_fake_cuda.pt"):
            if (cuda_case["source_file"], cuda_case["name"]) == ("fp8_fake_exhaustive.pt", case["name"]):
                return cuda_case["y_cuda"]
    return case["y"]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("amax", AMAX_VALUES, ids=[repr(a) for a in AMAX_VALUES])
def test_fp8_fake_quant_over_all_bf16_patterns(amax, flavor):
    x = every_16_bit_pattern(torch.bfloat16)
    y = rq.fp8_fake_quant(x, amax, flavor=flavor)
    s, inv = spec_scales(amax, flavor)

    expected = _vector_y(amax, flavor)
    if expected is not None:
        assert_bitexact(y, expected, f"modelopt vector, amax {amax}, {flavor}")

    # Independent pipeline: docs/modelopt_behaviour.md §1.3 with the enumerated E4M3 rounding.
    v = (x.float() * s).clamp(-E4M3_MAX, E4M3_MAX)
    assert_bitexact(y, (oracle_e4m3(v) * inv).to(torch.bfloat16), f"independent E4M3 model, amax {amax}")

    # NaN in <=> NaN out; signed zeros kept; every non-NaN output carries the sign of its input.
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    finite_in = ~torch.isnan(x)
    assert torch.equal(torch.signbit(y[finite_in]), torch.signbit(x[finite_in]))
    zeros = x == 0
    assert torch.equal(bits_of(y[zeros]), bits_of(x[zeros]))

    # Saturation at +-fl(448 * rcp(s)), rounded to bf16; +-inf lands there.
    saturation = (torch.tensor(E4M3_MAX) * inv).to(torch.bfloat16)
    assert y[finite_in].abs().max() == saturation
    assert_bitexact(y[x == float("inf")], saturation.reshape(1), "+inf")
    assert_bitexact(y[x == -float("inf")], -saturation.reshape(1), "-inf")

    # Monotone non-decreasing over the inputs sorted by value.
    order = torch.sort(x[finite_in].float(), stable=True).indices
    y_sorted = y[finite_in][order].float()
    assert bool((y_sorted[1:] >= y_sorted[:-1]).all()), "fake quant must be monotone"

    # Outputs lie on the E4M3 grid times the inverse scale, and every grid point is reached:
    # 126 magnitudes of each sign plus zero = 253 distinct values (docs/test_vectors.md §5.1).
    grid = torch.cat([-e4m3_positive_values().flip(0), e4m3_positive_values()]).float()
    on_grid = (grid * inv).to(torch.bfloat16).unique()
    assert bool(torch.isin(y[finite_in], on_grid).all())
    assert y[finite_in].unique().numel() == on_grid.numel() == 253


# --- NVFP4 over every finite bf16 value (nvfp4_fake_sweep.pt) ---------------------------------------


SWEEP_NAMES = [case["name"] for case in vector_cases("nvfp4_fake_sweep.pt")]


@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_nvfp4_fake_quant_equals_real_dequantize_on_the_bf16_sweep(name):
    case = find_case("nvfp4_fake_sweep.pt", name)
    fake = rq.nvfp4_fake_quant(case["x"], case["global_amax"])
    real = rq.nvfp4_quantize(case["x"], case["global_amax"]).dequantize()
    assert_bitexact(fake, real, f"{name}: fake vs real dequantize")
    assert_bitexact(fake, case["y"], f"{name}: fake vs modelopt CPU stand-in")
    cuda_case = next(
        c for c in vector_cases("nvfp4_fake_cuda.pt") if (c["source_file"], c["name"]) == ("nvfp4_fake_sweep.pt", name)
    )
    assert_bitexact(fake, cuda_case["y_cuda_tensorquantizer"], f"{name}: fake vs modelopt Triton kernel")


def test_nvfp4_sweep_covers_every_finite_bf16_pattern():
    case = vector_cases("nvfp4_fake_sweep.pt")[0]
    everything = every_16_bit_pattern(torch.bfloat16)
    finite_bits = bits_of(everything[torch.isfinite(everything)]).int() & 0xFFFF  # patterns are unsigned
    assert torch.equal(case["patterns"], finite_bits)
    assert torch.equal(bits_of(case["x"][:, 0]).int() & 0xFFFF, finite_bits)


def oracle_e2m1_magnitude(u: torch.Tensor) -> torch.Tensor:
    """Nearest of {0, .5, 1, 1.5, 2, 3, 4, 6} to |u| (>= 6 saturates), ties to the even index."""
    grid = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    distance = (u.double().abs().clamp(max=6.0).unsqueeze(-1) - grid).abs()
    nearest = distance.min(dim=-1, keepdim=True).values
    candidates = distance == nearest
    even_tie = candidates & (torch.arange(8) % 2 == 0)
    index = torch.where(candidates.sum(-1) > 1, even_tie.int().argmax(-1), candidates.int().argmax(-1))
    return grid[index].float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_e2m1_rounding_equals_independent_nearest_even_on_every_16bit_pattern(dtype):
    u = every_16_bit_pattern(dtype).float()
    u = u[torch.isfinite(u)].abs()
    index = e2m1_magnitude_index(u).long()
    assert torch.equal(torch.tensor(E2M1_MAGNITUDES)[index], oracle_e2m1_magnitude(u))


def test_e2m1_rounding_equals_the_oracle_on_the_fp32_neighbours_of_every_boundary():
    """The add-and-subtract rounding (refquant.numerics.nvfp4.e2m1_round_magnitude) against the oracle on
    the 2,001 fp32 values around each decision point, each magnitude, each binade edge of the
    step (2, 4) and the values that leave the trick's range (2**23 .. 2**26, inf); NaN -> 6."""
    from refquant.numerics.formats import E2M1_DECISION_POINTS
    from refquant.numerics.nvfp4 import e2m1_round_magnitude

    centres = torch.tensor([*E2M1_DECISION_POINTS, *E2M1_MAGNITUDES[1:], 8.0, 2.0**23, 2.0**24, 2.0**25, 2.0**26])
    offsets = torch.arange(-1000, 1001, dtype=torch.int32)
    u = (centres.view(torch.int32)[:, None] + offsets).view(torch.float32).flatten()
    u = torch.cat([u, torch.tensor([0.0, float("inf"), torch.finfo(torch.float32).max, 2.0**-149])])
    assert torch.equal(e2m1_round_magnitude(u), oracle_e2m1_magnitude(u))
    index = e2m1_magnitude_index(u).long()
    assert torch.equal(torch.tensor(E2M1_MAGNITUDES)[index], oracle_e2m1_magnitude(u))
    nan = torch.tensor([float("nan")])
    assert e2m1_round_magnitude(nan).item() == 6.0 and e2m1_magnitude_index(nan).item() == 7


def test_nvfp4_unit_scale_sweep_rounds_each_value_to_nearest_e2m1():
    """G = 2688 (wsf2 = 1) with companion 6: the block scale is exactly 1 for |v| <= 6, so each
    output is the E2M1 rounding of v itself, sign kept, +0.0 for values that round to zero."""
    case = find_case("nvfp4_fake_sweep.pt", "bf16_sweep_G2688.0_companion6.0")
    v = case["x"][:, 0]
    in_range = v.abs() <= 6
    qtensor = rq.nvfp4_quantize(case["x"][in_range], case["global_amax"])
    assert bool((qtensor.block_scale.float() == 1.0).all())
    magnitude = oracle_e2m1_magnitude(v[in_range].float())
    expected = torch.where(magnitude == 0, 0.0, torch.copysign(magnitude, v[in_range].float()))
    assert_bitexact(qtensor.dequantize(torch.float32)[:, 0], expected, "E2M1(v) at scale 1")
