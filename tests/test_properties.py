"""Properties of the numerics, checked with hypothesis on random tensors (bit for bit, NaN == NaN).

What holds, precisely (docs/numerics.md explains why):
- FP8 fake quant: sign symmetric, bit for bit (E4M3 keeps the sign of zero, so -0.0 stays -0.0);
  idempotent for a fixed amax, every dtype and both flavors.
- FP8 real quant: FP8Tensor.dequantize() == fp8_fake_quant(x, amax) when amax = 448 * 2**k with 2**k
  a normal number of x's dtype: the scales are then exact powers of two, so "multiply by rcp(s) in
  fp32" (fake) and "divide, then multiply in the target dtype" (real) round identically. For any
  other amax they may differ (docs/modelopt_behaviour.md §2.2-2.3).
- NVFP4 fake quant: sign symmetric except that it never gives -0.0 (a negative that rounds to zero
  comes out +0.0, §3.5). NVFP4 real quant: codes of -x are the codes of x with the sign bit
  flipped, except where x / S is +-0 (code 0 both ways) or NaN (code 7 both ways).
- NVFP4 idempotence with a fixed global amax G, for blocks whose E4M3 block scale is normal
  (>= 2**-6), whose fp32 scale S = e * g is >= 1e-5 and whose outputs are finite in x's dtype:
  fake(fake(x)) == fake(x), and quantize(dequantize(quantize(x))) has the same block scales and
  codes (code 8, "-0", comes back as code 0). Under a subnormal block scale the largest element can
  round to 4 instead of 6 and the scale shrinks: not idempotent (example below).
- dequantize(quantize(x)) == nvfp4_fake_quant(x) for fp32 x under the same global scale (flavor
  "modelopt-cuda", whose wsf2 = G * rcp(2688) is the fake path's) and the same block conditions
  (§4.7), except where |x| / S is within 2 fp32 ulp of an E2M1 decision point: there the real
  path's IEEE division and the fake path's kernel division (|x| * R(S), R the GPU's reciprocal,
  docs/numerics.md) may round apart. (The two block scales could also part, where m / fl(6 g) sits
  next to an E4M3 rounding midpoint; random fp32 blocks practically never do.)
- pack / unpack of E2M1 nibbles are inverse bijections.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refquant as rq
from refquant.numerics.formats import E2M1_DECISION_POINTS, NVFP4_BLOCK_SIZE
from refquant.numerics.nvfp4 import pack_e2m1, unpack_e2m1
from refquant.testing import assert_bitexact, bits_of

SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
FLAVORS = st.sampled_from(["modelopt-cpu", "modelopt-cuda"])
SEEDS = st.integers(0, 2**31 - 1)
SPECIALS = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])


def random_tensor(seed: int, dtype: torch.dtype, scale: float, n: int = 257) -> torch.Tensor:
    """n values over many binades (randn times a heavy-tailed factor) plus +-0 and +-inf."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen, dtype=torch.float64) * torch.rand(n, generator=gen, dtype=torch.float64) ** 6
    values = values * scale * 4
    return torch.cat([values, SPECIALS.double()]).to(dtype)


def blocky_tensor(seed: int, dtype: torch.dtype, global_amax: float, rows: int, blocks: int, drop: int) -> torch.Tensor:
    """(rows, blocks * 16 - drop) values whose blocks have ideal E4M3 scales in [2**-5, 440].

    Block b's max is 6 * ratio_b * g (g = G / 2688), so its E4M3 scale is ~ratio_b: normal, and with
    G >= 1, S = ratio * g >= 2**-5 / 2688 > 1e-5. This is the domain of the NVFP4 properties.
    """
    gen = torch.Generator().manual_seed(seed)
    log_ratio = torch.rand(rows, blocks, 1, generator=gen, dtype=torch.float64) * (math.log2(440) + 5) - 5
    values = torch.randn(rows, blocks * NVFP4_BLOCK_SIZE, generator=gen, dtype=torch.float64)
    values[..., values.shape[-1] - drop :] = 0.0  # dropped below; zero so they don't set a block max
    values = values.unflatten(-1, (blocks, NVFP4_BLOCK_SIZE))
    values = values / values.abs().amax(dim=-1, keepdim=True) * 6 * 2.0**log_ratio * (global_amax / 2688)
    x = values.flatten(-2)
    return x[..., : x.shape[-1] - drop].to(dtype)


def negate_keeping_positive_zero(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y == 0, torch.zeros_like(y), -y)


# --- FP8 ------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, flavor=FLAVORS, log2_amax=st.floats(-20, 20), dynamic=st.booleans())
def test_fp8_fake_quant_is_sign_symmetric(seed, dtype, flavor, log2_amax, dynamic):
    x = random_tensor(seed, dtype, 2.0**log2_amax)
    amax = None if dynamic else 2.0**log2_amax * 1.37
    if dynamic:
        x = x[torch.isfinite(x)]  # an inf makes the dynamic amax inf and every output NaN
    assert_bitexact(rq.fp8_fake_quant(-x, amax, flavor=flavor), -rq.fp8_fake_quant(x, amax, flavor=flavor))


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, flavor=FLAVORS, log2_amax=st.floats(-20, 20))
def test_fp8_fake_quant_is_idempotent_for_a_fixed_amax(seed, dtype, flavor, log2_amax):
    amax = 2.0**log2_amax
    x = random_tensor(seed, dtype, amax)
    once = rq.fp8_fake_quant(x, amax, flavor=flavor)
    assert_bitexact(rq.fp8_fake_quant(once, amax, flavor=flavor), once)


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, flavor=FLAVORS, log2_spread=st.floats(-10, 10))
def test_fp8_fake_quant_per_channel_is_idempotent_and_sign_symmetric(seed, dtype, flavor, log2_spread):
    gen = torch.Generator().manual_seed(seed)
    channel_amax = 2.0 ** (torch.rand(8, 1, generator=gen) * log2_spread)
    x = (torch.randn(8, 32, generator=gen) * channel_amax).to(dtype)
    once = rq.fp8_fake_quant(x, channel_amax, flavor=flavor)
    assert_bitexact(rq.fp8_fake_quant(once, channel_amax, flavor=flavor), once)
    assert_bitexact(rq.fp8_fake_quant(-x, channel_amax, flavor=flavor), -once)


def _normal_power_of_two_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.finfo(dtype)
    return math.ceil(math.log2(info.tiny)), math.floor(math.log2(info.max))


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, flavor=FLAVORS, exponent=st.integers(-30, 30))
def test_fp8_real_dequantize_equals_fake_quant_for_power_of_two_scales(seed, dtype, flavor, exponent):
    low, high = _normal_power_of_two_range(dtype)
    exponent = min(max(exponent, low), high)  # 2**k must be a normal number of x's dtype
    amax = 448.0 * 2.0**exponent
    x = torch.cat([random_tensor(seed, dtype, amax), torch.tensor([float("nan")], dtype=dtype)])
    real = rq.fp8_quantize(x, amax=amax, flavor=flavor)
    assert_bitexact(real.dequantize(), rq.fp8_fake_quant(x, amax, flavor=flavor))
    given_scale = rq.fp8_quantize(x, scale=2.0**exponent, flavor=flavor)
    assert_bitexact(given_scale.data.view(torch.uint8), real.data.view(torch.uint8))


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, log2_scale=st.floats(-12, 12))
def test_fp8_quantize_is_sign_symmetric_in_its_bytes(seed, dtype, log2_scale):
    x = random_tensor(seed, dtype, 2.0**log2_scale)
    amax = 2.0**log2_scale * 3.3
    positive, negative = rq.fp8_quantize(x, amax=amax), rq.fp8_quantize(-x, amax=amax)
    assert_bitexact(negative.data.view(torch.uint8), positive.data.view(torch.uint8) ^ 0x80)


# --- NVFP4 ----------------------------------------------------------------------------------------

GLOBAL_AMAX = st.floats(1.0, 2.0**15)  # < 65504: fp16 outputs stay finite
SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(0, 15))  # rows, blocks, dropped


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, log2_scale=st.floats(-10, 10), given_amax=st.booleans())
def test_nvfp4_fake_quant_is_sign_symmetric_and_never_negative_zero(seed, dtype, log2_scale, given_amax):
    x = random_tensor(seed, dtype, 2.0**log2_scale, n=252).reshape(4, 64)
    amax = 2.0**log2_scale * 2 if given_amax else None
    positive, negative = rq.nvfp4_fake_quant(x, amax), rq.nvfp4_fake_quant(-x, amax)
    assert_bitexact(negative, negate_keeping_positive_zero(positive))
    for y in (positive, negative):
        assert not bool(((y == 0) & torch.signbit(y)).any()), "NVFP4 fake quant never writes -0.0"


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, log2_scale=st.floats(-10, 10), flavor=FLAVORS)
def test_nvfp4_quantize_negation_flips_only_the_sign_bit(seed, dtype, log2_scale, flavor):
    x = random_tensor(seed, dtype, 2.0**log2_scale, n=236).reshape(3, 80)
    positive, negative = rq.nvfp4_quantize(x, flavor=flavor), rq.nvfp4_quantize(-x, flavor=flavor)
    assert_bitexact(negative.global_scale, positive.global_scale)
    assert_bitexact(negative.block_scale, positive.block_scale)
    # The sign bit is `x / S < 0`: a quotient of +-0 (x = +-0, or x / inf under an infinite
    # computed amax) gets code 0 either way, and a NaN quotient (inf / inf) code 7 either way.
    divisor = (positive.block_scale.float() * positive.global_scale).repeat_interleave(16, dim=-1)
    quotient = x.float() / divisor[..., : x.shape[-1]]
    unsigned = (quotient == 0) | torch.isnan(quotient)
    expected = torch.where(unsigned, positive.codes(), positive.codes() ^ 0b1000)
    assert_bitexact(negative.codes(), expected)
    assert_bitexact(negative.dequantize(), negate_keeping_positive_zero(positive.dequantize()))


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, global_amax=GLOBAL_AMAX, shape=SHAPES)
def test_nvfp4_fake_quant_is_idempotent_for_a_fixed_global_amax_and_normal_block_scales(seed, dtype, global_amax, shape):
    x = blocky_tensor(seed, dtype, global_amax, *shape)
    once = rq.nvfp4_fake_quant(x, global_amax)
    assert_bitexact(rq.nvfp4_fake_quant(once, global_amax), once)


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, flavor=FLAVORS, global_amax=GLOBAL_AMAX, shape=SHAPES)
def test_nvfp4_requantizing_a_dequantized_tensor_keeps_scales_and_codes(seed, dtype, flavor, global_amax, shape):
    x = blocky_tensor(seed, dtype, global_amax, *shape)
    first = rq.nvfp4_quantize(x, global_amax, flavor=flavor)
    second = rq.nvfp4_quantize(first.dequantize(), global_amax, flavor=flavor)
    assert_bitexact(second.block_scale, first.block_scale)
    negative_zero_to_zero = torch.where(first.codes() == 0b1000, 0, first.codes()).to(torch.uint8)
    assert_bitexact(second.codes(), negative_zero_to_zero)


def test_nvfp4_fake_quant_is_not_idempotent_under_a_subnormal_block_scale():
    """G = 2688 (g = 1): block max 0.01875 = 6 * 1.6 * 2**-9 gets the E4M3 scale 2**-8 (1.6 rounds
    to 2 on the subnormal grid), so the max becomes 4 * 2**-8; re-quantized, that block's scale is
    2**-9 and the max becomes 6 * 2**-9."""
    x = torch.zeros(16)
    x[0] = 0.01875
    once = rq.nvfp4_fake_quant(x, 2688.0)
    twice = rq.nvfp4_fake_quant(once, 2688.0)
    assert once[0].item() == 4 * 2.0**-8
    assert twice[0].item() == 6 * 2.0**-9


def _near_decision_point(u: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    near = torch.zeros_like(u, dtype=torch.bool)
    for point in E2M1_DECISION_POINTS:
        low = high = torch.tensor(point)
        for _ in range(ulps):
            low, high = torch.nextafter(low, torch.tensor(0.0)), torch.nextafter(high, torch.tensor(8.0))
        near |= (u >= low) & (u <= high)
    return near


@SETTINGS
@given(seed=SEEDS, global_amax=GLOBAL_AMAX, shape=SHAPES)
def test_nvfp4_dequantize_of_quantize_equals_fake_quant_for_fp32(seed, global_amax, shape):
    x = blocky_tensor(seed, torch.float32, global_amax, *shape)
    real = rq.nvfp4_quantize(x, global_amax, flavor="modelopt-cuda")
    fake = rq.nvfp4_fake_quant(x, global_amax)
    scale = (real.block_scale.float().unsqueeze(-1) * real.global_scale).expand(*real.block_scale.shape, 16)
    u = x.abs() / scale.flatten(-2)[..., : x.shape[-1]]
    comparable = ~_near_decision_point(u)
    assert_bitexact(real.dequantize()[comparable], fake[comparable])


@SETTINGS
@given(seed=SEEDS, global_amax=GLOBAL_AMAX, shape=SHAPES)
def test_nvfp4_flavors_differ_only_through_the_global_scale(seed, global_amax, shape):
    """The CPU flavor's wsf2 = G / 2688 differs from G * rcp(2688) for about one G in four; where the
    two agree, so does everything else (so the fake-vs-real property above holds for the CPU
    flavor exactly then)."""
    x = blocky_tensor(seed, torch.float32, global_amax, *shape)
    cpu, cuda = rq.nvfp4_quantize(x, global_amax), rq.nvfp4_quantize(x, global_amax, flavor="modelopt-cuda")
    if bits_of(cpu.global_scale) == bits_of(cuda.global_scale):
        assert_bitexact(cpu, cuda)


def test_pack_of_unpack_is_identity_on_all_256_bytes():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert_bitexact(pack_e2m1(unpack_e2m1(every_byte)), every_byte)
    # Byte j holds element 2j in its low nibble (docs/modelopt_behaviour.md §4.3).
    assert_bitexact(unpack_e2m1(torch.tensor([0x7A], dtype=torch.uint8)), torch.tensor([0xA, 0x7], dtype=torch.uint8))


@SETTINGS
@given(codes=st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_unpack_of_pack_is_identity_on_codes(codes):
    codes = torch.tensor(codes, dtype=torch.uint8)
    assert_bitexact(unpack_e2m1(pack_e2m1(codes)), codes)


@SETTINGS
@given(seed=SEEDS, dtype=DTYPES, shape=SHAPES)
def test_nvfp4_tensor_codes_are_its_packed_bytes_unpacked(seed, dtype, shape):
    x = blocky_tensor(seed, dtype, 100.0, *shape)
    qtensor = rq.nvfp4_quantize(x)
    assert qtensor.packed.shape[-1] * 2 == qtensor.codes().shape[-1] == qtensor.block_scale.shape[-1] * 16
    assert_bitexact(pack_e2m1(qtensor.codes()), qtensor.packed)
